//! vCPUs: their initial state, and the thread (`vcpu<N>`) that runs each
//! one and answers its port I/O and MMIO exits from the shared buses.
//!
//! vCPU 0 starts in 64-bit long mode at a bzImage's 64-bit entry point, or
//! in 32-bit protected mode at a vmlinux's PVH entry point.
//! The others wait for INIT/SIPI, which KVM's in-kernel local APIC handles
//! (their MP state starts as "uninitialized"); their threads block in
//! `KVM_RUN` until the guest wakes them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{kvm_fpu, kvm_regs, CpuId, Msrs, kvm_msr_entry};
use kvm_ioctls::{VcpuExit, VcpuFd};

use kickvm_virtio::ratelimit::Throttle;
use kickvm_virtio::seccomp::{self, SeccompMode};

use crate::boot::{gdt, Entry};
use crate::bus::Bus;
use crate::layout;
use crate::platform::{Control, Exit};
use crate::vcpu_dump::{self, ExitCounts};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {id}: {err}")]
    Create { id: u32, err: kvm_ioctls::Error },
    #[error("cannot set up vCPU {id} ({what}): {err}")]
    Setup { id: u32, what: &'static str, err: kvm_ioctls::Error },
    #[error("cannot start the thread of vCPU {id}: {err}")]
    Spawn { id: u32, err: std::io::Error },
}

/// MSRs set on every vCPU before it first runs (a clean, defined state as
/// after firmware: syscall MSRs zero, fast strings on, MTRRs enabled with
/// write-back as the default type). The TSC is left alone: writing it per
/// vCPU at slightly different times makes Linux call the TSCs unsynchronised.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    const IA32_SYSENTER_CS: u32 = 0x174;
    const IA32_SYSENTER_ESP: u32 = 0x175;
    const IA32_SYSENTER_EIP: u32 = 0x176;
    const IA32_MISC_ENABLE: u32 = 0x1a0;
    const MTRR_DEF_TYPE: u32 = 0x2ff;
    const STAR: u32 = 0xc000_0081;
    const LSTAR: u32 = 0xc000_0082;
    const CSTAR: u32 = 0xc000_0083;
    const SYSCALL_MASK: u32 = 0xc000_0084;
    const KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MTRR_ENABLE: u64 = 1 << 11;
    const MTRR_TYPE_WB: u64 = 6;
    vec![
        (IA32_SYSENTER_CS, 0),
        (IA32_SYSENTER_ESP, 0),
        (IA32_SYSENTER_EIP, 0),
        (STAR, 0),
        (CSTAR, 0),
        (KERNEL_GS_BASE, 0),
        (SYSCALL_MASK, 0),
        (LSTAR, 0),
        (IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WB),
    ]
}

/// vCPU set-ups where KVM took fewer boot MSRs than asked (every vCPU of
/// every boot: a rebooting guest repeats it).
static MSR_SHORTFALL: Throttle = Throttle::new();

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Local APIC LVT registers and delivery modes.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Sets CPUID, MSRs, FPU and the local APIC's LINT pins of vCPU `id`.
pub fn configure(vcpu: &VcpuFd, id: u32, cpuid: &CpuId) -> Result<(), VcpuError> {
    let err = |what, err| VcpuError::Setup { id, what, err };
    vcpu.set_cpuid2(cpuid).map_err(|e| err("CPUID", e))?;

    let entries: Vec<kvm_msr_entry> =
        boot_msrs().into_iter().map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|_| err("MSRs", kvm_ioctls::Error::new(libc::EINVAL)))?;
    let set = vcpu.set_msrs(&msrs).map_err(|e| err("MSRs", e))?;
    // KVM stops at the first MSR it refuses; the rest keep their reset
    // values, which a kernel copes with. Said at the first few boots only.
    if set != entries.len() && MSR_SHORTFALL.hit().is_some() {
        log::debug!("vCPU {id}: KVM accepted {set} of {} boot MSRs", entries.len());
    }

    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(|e| err("FPU", e))?;

    let mut lapic = vcpu.get_lapic().map_err(|e| err("LAPIC", e))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT_LINT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(|e| err("LAPIC", e))?;
    Ok(())
}

fn set_lvt_mode(regs: &mut [libc::c_char], reg: usize, mode: u32) {
    let Some(bytes) = regs.get_mut(reg..reg + 4) else { return };
    let mut v = [0u8; 4];
    for (d, s) in v.iter_mut().zip(bytes.iter()) {
        *d = *s as u8;
    }
    let value = (u32::from_le_bytes(v) & !0x700) | (mode << 8);
    for (d, s) in bytes.iter_mut().zip(value.to_le_bytes()) {
        *d = s as libc::c_char;
    }
}

/// Puts the boot vCPU where `entry` says the kernel starts: in 64-bit mode
/// with the boot GDT, the identity page tables and `rsi` pointing at the
/// zero page, or (PVH) in flat 32-bit protected mode, paging off, with
/// `rbx` pointing at the `hvm_start_info`.
pub fn set_boot_state(vcpu: &VcpuFd, entry: Entry) -> Result<(), VcpuError> {
    let err = |what, err| VcpuError::Setup { id: 0, what, err };
    let mut sregs = vcpu.get_sregs().map_err(|e| err("segment registers", e))?;
    let code = match entry {
        Entry::Linux64(_) => gdt::CODE_INDEX,
        Entry::Pvh32(_) => gdt::CODE32_INDEX,
    };
    let data = gdt::segment(gdt::DATA_INDEX);
    sregs.cs = gdt::segment(code);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::segment(gdt::TSS_INDEX);
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (gdt::GDT.len() * 8 - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;
    let mut regs = kvm_regs { rflags: 0x2, ..Default::default() };
    match entry {
        Entry::Linux64(rip) => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = rip;
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
            regs.rsi = layout::ZERO_PAGE_START;
        }
        Entry::Pvh32(eip) => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_NE;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = eip;
            regs.rbx = layout::PVH_INFO_START;
        }
    }
    vcpu.set_sregs(&sregs).map_err(|e| err("segment registers", e))?;
    vcpu.set_regs(&regs).map_err(|e| err("registers", e))?;
    Ok(())
}

/// A running vCPU thread.
pub struct VcpuThread {
    handle: std::thread::JoinHandle<()>,
}

/// CPU time of the calling thread (user + system), in µs.
fn thread_cpu_us() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into `t`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0) / 1000
}

impl VcpuThread {
    /// Starts thread `vcpu<id>` running `vcpu` until `stop` is set; it
    /// answers the requests for its state made after `vcpu_dump::requests`
    /// returned `dumps_since` (taken before the VM's first vCPU starts, so
    /// that one crashing at once still hears from the others).
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        id: u32,
        vcpu: VcpuFd,
        pio: Bus,
        mmio: Bus,
        control: Arc<Control>,
        stop: Arc<AtomicBool>,
        seccomp: SeccompMode,
        dumps_since: u64,
    ) -> Result<VcpuThread, VcpuError> {
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                if let Err(e) = sandbox(seccomp) {
                    control.request(Exit::Error(format!("vcpu{id}: {e}")));
                    return;
                }
                contained(id, &control, || run(id, vcpu, &pio, &mmio, &control, &stop, dumps_since));
                // The guest's share of the VMM's CPU time (KVM_RUN counts
                // as this thread's): what a measurement of the VMM's own
                // work subtracts (the API benchmark, docs/api.md). A guest
                // rebooting in a loop ends vCPU threads in a loop: rate-limited.
                static ENDED: kickvm_virtio::ratelimit::Throttle = kickvm_virtio::ratelimit::Throttle::new();
                if ENDED.hit().is_some() {
                    log::debug!("vcpu{id}: {} µs of CPU", thread_cpu_us());
                }
            })
            .map_err(|err| VcpuError::Spawn { id, err })?;
        Ok(VcpuThread { handle })
    }

    /// Knocks the thread out of `KVM_RUN` (the caller has set `stop`) until
    /// it has exited, then joins it. Repeats the signal because one sent
    /// just before the thread enters `KVM_RUN` would be lost.
    pub fn stop_and_join(self) {
        let _ = kickvm_virtio::sys::wake_until_finished(self.handle);
    }
}

/// A vCPU thread's system calls beyond every thread's
/// (`seccomp::RUNTIME`): `KVM_RUN` and the KVM and TAP ioctls a driver's
/// accesses lead to (irqfds, ioeventfds, GSI routes, offloads at
/// DRIVER_OK), eventfds for interrupts; with `seccomp::SPAWN_THREADS`
/// and every device's list, starting and stopping queue threads (they
/// inherit this filter before adding their own).
pub const SYSCALLS: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_read,
    libc::SYS_eventfd2,
    libc::SYS_dup,
    libc::SYS_fcntl,
    libc::SYS_close,
];

/// Installs the vCPU filter on the calling thread.
pub fn sandbox(mode: SeccompMode) -> Result<(), kickvm_virtio::seccomp::SeccompError> {
    let mut lists: Vec<&[i64]> = vec![SYSCALLS, seccomp::SPAWN_THREADS, seccomp::QUEUE_THREAD];
    lists.extend(crate::devices::KINDS.iter().map(|k| k.syscalls()));
    seccomp::apply("vcpu", &lists, mode)
}

/// Runs the vCPU loop `f` so that a panic in it — a device that failed on
/// some guest access — stops the VM with a message instead of leaving a
/// dead vCPU and a launcher waiting for it forever.
fn contained(id: u32, control: &Control, f: impl FnOnce()) {
    if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        let what = kickvm_virtio::threads::panic_message(p.as_ref());
        crate::throttles::VCPU_PANICS.hit();
        control.request(Exit::Error(format!("vcpu{id}: internal error answering a guest access: {what}")));
    }
}

/// The vCPU loop: run until the guest does something that needs the
/// launcher, answer it, go back in. Between exits it answers requests for
/// its state (SIGUSR1, or another vCPU's triple fault: `vcpu_dump`) made
/// since `since`.
fn run(id: u32, mut vcpu: VcpuFd, pio: &Bus, mmio: &Bus, control: &Control, stop: &AtomicBool, since: u64) {
    let _registered = vcpu_dump::Registered::this_thread();
    let mut counts = ExitCounts::default();
    let mut answered = since;
    loop {
        let asked = vcpu_dump::requests();
        if asked != answered {
            answered = asked;
            log::warn!("{}", vcpu_dump::dump(&format!("vcpu{id}: state on request"), &vcpu, &counts, thread_cpu_us(), false));
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
        let exit = match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                counts.io_in += 1;
                pio.read(u64::from(port), data);
                continue;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                counts.io_out += 1;
                pio.write(u64::from(port), data);
                continue;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                counts.mmio_read += 1;
                mmio.read(addr, data);
                continue;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                counts.mmio_write += 1;
                mmio.write(addr, data);
                continue;
            }
            Ok(VcpuExit::Intr) => {
                counts.interrupted += 1;
                continue;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                counts.interrupted += 1;
                continue;
            }
            // With the in-kernel irqchip, HLT never exits unless the vCPU
            // can never wake up (interrupts off): the guest has stopped.
            Ok(VcpuExit::Hlt) => Exit::PowerOff,
            // A triple fault resets a PC. What the CPU was doing is all
            // there is to go on, so it is logged (the first few times, then
            // rarely: a guest may crash in a loop), and the other vCPUs are
            // asked for theirs before the reset stops them.
            Ok(VcpuExit::Shutdown) => {
                if let Some(n) = crate::throttles::TRIPLE_FAULTS.hit() {
                    let headline = format!("vcpu{id}: triple fault, resetting (#{n})");
                    log::warn!("{}", vcpu_dump::dump(&headline, &vcpu, &counts, thread_cpu_us(), true));
                    vcpu_dump::request_all();
                }
                Exit::TripleFault
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Exit::PowerOff,
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Exit::Reset,
                other => Exit::Error(format!("vcpu{id}: guest system event {other}")),
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                Exit::Error(format!("vcpu{id}: KVM could not enter the guest (reason {reason:#x}, cpu {cpu})"))
            }
            Ok(VcpuExit::InternalError) => Exit::Error(format!("vcpu{id}: KVM internal error (emulation failure)")),
            Ok(other) => Exit::Error(format!("vcpu{id}: unexpected exit {other:?}")),
            Err(e) => Exit::Error(format!("vcpu{id}: KVM_RUN failed: {e}")),
        };
        control.request(exit);
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_mode_keeps_other_bits() {
        let mut regs = [0 as libc::c_char; 1024];
        regs[APIC_LVT_LINT0] = 0x30;
        regs[APIC_LVT_LINT0 + 2] = 1; // mask bit 16
        set_lvt_mode(&mut regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT_LINT0] as u8, 0x30);
        assert_eq!(regs[APIC_LVT_LINT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT_LINT0 + 2] as u8, 1);
    }

    #[test]
    fn a_panic_answering_the_guest_stops_the_vm_with_a_message() {
        let control = Control::new().unwrap();
        contained(3, &control, || panic!("device fell over"));
        match control.wait() {
            Exit::Error(m) => assert_eq!(m, "vcpu3: internal error answering a guest access: device fell over"),
            other => panic!("{other:?}"),
        }
        let control = Control::new().unwrap();
        contained(0, &control, || {});
        assert!(!control.stopping());
    }

    #[test]
    fn boot_msrs_are_unique() {
        let m = boot_msrs();
        let mut idx: Vec<u32> = m.iter().map(|(i, _)| *i).collect();
        idx.sort();
        idx.dedup();
        assert_eq!(idx.len(), m.len());
    }

    /// A port the probe answers on.
    const PROBE_PORT: u64 = 0x3f0;

    /// On a guest's `out`, tries what a vCPU never needs — on the vCPU
    /// thread, which answers the access.
    struct Probe(std::sync::mpsc::Sender<([(i64, i32); 3], String)>);

    impl crate::bus::BusDevice for Probe {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {
            let _ = self.0.send(seccomp::attempt_forbidden());
        }
    }

    /// A real vCPU thread, started as the launcher starts it, running a
    /// guest that writes to a port: the write is answered on that thread,
    /// whose filter refuses `socket`, `open` and `execve`. Skipped without
    /// a usable /dev/kvm.
    #[test]
    fn the_vcpu_thread_itself_is_refused_sockets_files_and_programs() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipped: no usable /dev/kvm");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        // One page of guest RAM at 0x1000: mov dx, PROBE_PORT; out dx, al; hlt.
        let code = [0xba, PROBE_PORT as u8, (PROBE_PORT >> 8) as u8, 0xee, 0xf4];
        // SAFETY: a fresh anonymous mapping of one page.
        let mem = unsafe {
            libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert_ne!(mem, libc::MAP_FAILED);
        // SAFETY: the code fits in the page just mapped.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), mem.cast::<u8>(), code.len()) };
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0x1000,
            memory_size: 4096,
            userspace_addr: mem as u64,
        };
        // SAFETY: the page stays mapped until the VM is gone (below).
        unsafe { vm.set_user_memory_region(region) }.unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        vcpu.set_regs(&kvm_bindings::kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() }).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let pio = crate::bus::Bus::new();
        pio.insert(Arc::new(std::sync::Mutex::new(Probe(tx))), PROBE_PORT, 1).unwrap();
        let control = Control::new().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let t = VcpuThread::spawn(0, vcpu, pio, crate::bus::Bus::new(), control.clone(), stop.clone(), SeccompMode::On, 0).unwrap();
        let got = rx.recv_timeout(std::time::Duration::from_secs(60));
        stop.store(true, Ordering::Release);
        t.stop_and_join();
        drop(vm);
        // SAFETY: our page; the VM that used it is gone.
        unsafe { libc::munmap(mem, 4096) };
        let (r, name) = got.expect("the guest's out reached the probe");
        assert_eq!(name, "vcpu0");
        assert_eq!(r, seccomp::ALL_REFUSED);
    }

    /// A vCPU thread is refused what it never needs, and the queue threads
    /// it starts at DRIVER_OK can still install their own filter on top.
    #[test]
    fn a_vcpu_is_refused_sockets_files_and_programs_but_starts_queue_threads() {
        let (refused, queue_thread) = std::thread::spawn(|| {
            sandbox(SeccompMode::On).unwrap();
            let (r, _) = seccomp::attempt_forbidden();
            let q = std::thread::Builder::new()
                .name("blk0-q0".into())
                .spawn(|| {
                    let lists: [&[i64]; 2] = [seccomp::QUEUE_THREAD, kickvm_virtio::block::SYSCALLS];
                    seccomp::apply("queue", &lists, SeccompMode::On).is_ok()
                })
                .unwrap()
                .join()
                .unwrap();
            (r, q)
        })
        .join()
        .unwrap();
        assert_eq!(refused, seccomp::ALL_REFUSED);
        assert!(queue_thread);
    }
}
