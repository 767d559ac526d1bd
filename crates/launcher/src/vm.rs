//! One VM, from `KVM_CREATE_VM` to the guest's power-off, reset or the
//! launcher's signal: memory, interrupt controllers, the loaded kernel and
//! its tables, platform devices, vCPU threads.
//!
//! A reboot is a new [`run`] with the same [`VmConfig`]: nothing of the old
//! VM (memory, devices, threads) survives into the new one.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress};
use kickvm_virtio::{GuestMemory, Runtime, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiConfig};
use crate::boot::{self, BootError, BootImage};
use crate::bus::Bus;
use crate::config::{io_reason, VmConfig};
use crate::cpuid;
use crate::devices;
use crate::irq::GsiRouter;
use crate::pci::{self, PciHost};
use crate::layout;
use crate::memory::{self, MemoryError};
use crate::platform::{ged_event, AcpiSleep, Control, Exit, Ged, GedRegister, I8042};
use crate::serial::{InputSink, SerialOut, SerialPort, StdinPump};
use crate::throttles;
use crate::vcpu::{self, VcpuError, VcpuThread};

/// Three pages KVM needs for the TSS on Intel, just below the BIOS area at
/// the top of 4 GiB, then one for the real-mode identity map.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    Host(String),
    #[error("{what}: {err}")]
    Kvm { what: &'static str, err: kvm_ioctls::Error },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot create the {what} eventfd: {source}")]
    EventFd { what: &'static str, source: std::io::Error },
    #[error(transparent)]
    Irq(#[from] crate::irq::IrqError),
    #[error(transparent)]
    Pci(#[from] crate::pci::PciError),
    #[error(transparent)]
    Device(#[from] devices::DeviceError),
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Kvm { what, err }
}

/// Opens the KVM device and checks it can run a stock kernel.
pub fn open_kvm(path: &Path, allow_slow: bool) -> Result<Kvm, VmError> {
    let rig_hint = "run kickvm inside the nested test rig: kickvm-rig run -- kickvm run ...";
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| VmError::Host(format!("KVM device path {} contains a NUL byte", path.display())))?;
    let kvm = Kvm::new_with_path(&cpath).map_err(|e| {
        let io = std::io::Error::from_raw_os_error(e.errno());
        VmError::Host(match io.kind() {
            std::io::ErrorKind::NotFound => {
                format!("no {}: this host has no KVM (load kvm_intel or kvm_amd, or {rig_hint})", path.display())
            }
            std::io::ErrorKind::PermissionDenied => format!(
                "cannot open {}: permission denied (add your user to the `kvm` group or run as root)",
                path.display()
            ),
            _ => format!("cannot open {}: {}", path.display(), io_reason(&io)),
        })
    })?;
    let api = kvm.get_api_version();
    if api < 0 {
        return Err(VmError::Host(format!("{} is not a KVM device (use /dev/kvm)", path.display())));
    }
    if api != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(VmError::Host(format!("{} speaks KVM API {api}, kickvm needs 12", path.display())));
    }
    for (cap, name) in [
        (Cap::Irqchip, "in-kernel irqchip"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Ioeventfd, "ioeventfd"),
        (Cap::UserMemory, "user memory"),
        (Cap::Pit2, "PIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::Host(format!("{} lacks KVM capability `{name}`", path.display())));
        }
    }
    if !allow_slow && Path::new("/sys/module/kvm_pvm").exists() {
        return Err(VmError::Host(format!(
            "this host's KVM is kvm_pvm, which emulates guest kernel code (~1.5 MIPS) and cannot boot Linux in useful time; {rig_hint} (--allow-slow-kvm overrides this for tiny test guests)"
        )));
    }
    Ok(kvm)
}

/// Checks what only KVM can tell about `cfg` (before a VM is created).
pub fn check_limits(kvm: &Kvm, cfg: &VmConfig) -> Result<(), VmError> {
    let max = kvm.get_max_vcpus();
    if usize::from(cfg.cpus) > max {
        return Err(VmError::Host(format!("--cpus {}: this host's KVM runs at most {max} vCPUs per VM", cfg.cpus)));
    }
    Ok(())
}

/// Things the guest's console is connected to that outlive one VM.
pub struct ConsoleIo {
    /// Where COM1 output goes (stdout by default).
    pub serial_out: Box<dyn Fn() -> SerialOut + Send + Sync>,
    /// Stdin, when it feeds COM1.
    pub stdin: Option<StdinPump>,
}

impl Default for ConsoleIo {
    fn default() -> Self {
        ConsoleIo { serial_out: Box::new(|| Box::new(std::io::stdout())), stdin: None }
    }
}

/// The vCPU threads of a VM; dropping this stops them.
struct Vcpus {
    stop: Arc<AtomicBool>,
    threads: Vec<VcpuThread>,
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            t.stop_and_join();
        }
    }
}

/// What a program embedding the launcher (the API server) learns of a VM
/// while it runs.
pub trait Watcher: Sync {
    /// The VM is set up and its vCPUs run: `vm` stops or resets it, lists
    /// its devices, presses its power button and plugs devices in.
    fn started(&self, vm: &Arc<LiveVm>);
    /// The vCPUs have stopped; the devices are about to be torn down.
    fn stopped(&self, exit: &Exit);
    /// The configuration to build the VM from after a guest reset, when it
    /// changed while the VM ran (devices plugged in); `None`: unchanged.
    fn config(&self) -> Option<VmConfig> {
        None
    }
}

/// A running VM, as the code that embeds the launcher drives it: from
/// when its vCPUs start until they stop (then [`LiveVm::hotplug`] fails).
pub struct LiveVm {
    pub control: Arc<Control>,
    ged: Arc<Ged>,
    mem: GuestMemory,
    runtime: Arc<Runtime>,
    /// Taken at tear-down: nothing is plugged into a VM that is stopping.
    pci: Mutex<Option<PciHost>>,
    /// Its virtio devices with their bus 0 slots, cold- and hot-plugged.
    devices: Mutex<Vec<(u8, Arc<Mutex<pci::VirtioPciDevice>>)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LiveVm {
    /// The virtio devices and their slots, in slot order (those the
    /// guest ejected left out).
    pub fn devices(&self) -> Vec<(u8, Arc<Mutex<pci::VirtioPciDevice>>)> {
        let mut d: Vec<_> = lock(&self.devices).iter().filter(|(_, d)| !lock(d).is_unplugged()).cloned().collect();
        d.sort_by_key(|(slot, _)| *slot);
        d
    }

    /// The slot of the device named `name`, if the VM has it.
    pub fn slot_of(&self, name: &str) -> Option<u8> {
        self.devices().into_iter().find(|(_, d)| lock(d).name() == name).map(|(slot, _)| slot)
    }

    /// Asks the guest to give back the device in `slot` (PCI hotplug
    /// Eject Request through the GED) and waits up to `timeout` for its
    /// `_EJ0`: true once the device is out of the VM and its backend
    /// closed; false if the guest has not let go yet (the request stands:
    /// if it ejects later, the device leaves then).
    pub fn unplug(&self, slot: u8, timeout: std::time::Duration) -> Result<bool, VmError> {
        let slots = {
            let pci = lock(&self.pci);
            let Some(host) = pci.as_ref() else {
                return Err(VmError::Host("the VM is stopping; its devices go with it".into()));
            };
            host.hotplug().request_removal(slot);
            host.hotplug().clone()
        };
        self.ged
            .raise(ged_event::PCI_HOTPLUG)
            .map_err(|e| VmError::Host(format!("cannot raise the PCI hotplug event: {e}")))?;
        let t0 = std::time::Instant::now();
        while slots.removal_pending(slot) {
            if t0.elapsed() > timeout {
                return Ok(false);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        lock(&self.devices).retain(|(_, d)| !lock(d).is_unplugged());
        if let Some(host) = lock(&self.pci).as_mut() {
            host.forget_unplugged();
        }
        Ok(true)
    }

    /// Presses the power button: the guest's ACPI button driver reports
    /// KEY_POWER (what the guest then does is its own business).
    pub fn press_power_button(&self) -> Result<(), VmError> {
        self.ged
            .raise(ged_event::POWER_BUTTON)
            .map_err(|e| VmError::Host(format!("cannot raise the power button event: {e}")))
    }

    /// Plugs `device` into the first free slot of bus 0 and tells the
    /// guest (PCI hotplug through the GED); returns the slot. Its queue
    /// threads start when the guest's driver sets DRIVER_OK.
    pub fn hotplug(&self, device: Box<dyn VirtioDevice>) -> Result<u8, VmError> {
        let name = device.name().to_string();
        let mut pci = lock(&self.pci);
        let Some(host) = pci.as_mut() else {
            return Err(VmError::Host(format!("{name}: the VM is stopping; nothing can be plugged in")));
        };
        let (dev, slot) = host
            .hotplug_virtio(device, &self.mem, &self.runtime)
            .map_err(|err| devices::DeviceError::Pci { name, err })?;
        lock(&self.devices).push((slot, dev));
        drop(pci);
        self.ged
            .raise(ged_event::PCI_HOTPLUG)
            .map_err(|e| VmError::Host(format!("cannot raise the PCI hotplug event: {e}")))?;
        Ok(slot)
    }
}

/// Boots the VM of `cfg`, and again after each guest reset unless
/// `no_reboot`, until the guest powers off, a signal or an error stops it
/// (or it resets, with `no_reboot`): the exit that ended it.
pub fn run_until_stopped(
    kvm: &Kvm,
    cfg: &VmConfig,
    io: &ConsoleIo,
    no_reboot: bool,
    watcher: Option<&dyn Watcher>,
) -> Result<Exit, VmError> {
    let mut boots = 0u64;
    loop {
        if let Some(sig) = crate::platform::pending_signal() {
            return Ok(Exit::Signal(sig));
        }
        boots = boots.saturating_add(1);
        // Devices plugged into (or taken out of) the VM that reset are
        // part of the next one.
        let changed = watcher.and_then(|w| w.config());
        let cfg = changed.as_ref().unwrap_or(cfg);
        // A reboot builds the VM anew from the same options: files may
        // have changed since the first boot (a disk replaced by a fifo
        // would hang the open), so they are checked again first.
        if boots > 1 {
            cfg.validate().map_err(|e| VmError::Host(format!("cannot boot again: {e}")))?;
        }
        match run_watched(kvm, cfg, io, watcher)? {
            Exit::Reset | Exit::TripleFault if !no_reboot => {
                // A guest may reboot in a loop: the first boots are logged, then rarely.
                if kickvm_virtio::ratelimit::should_log(boots) {
                    log::info!("the guest rebooted; boot #{}", boots + 1)
                }
            }
            exit => return Ok(exit),
        }
    }
}

/// Builds the VM described by `cfg`, runs it until it stops, tears it
/// down, and says why it stopped.
pub fn run(kvm: &Kvm, cfg: &VmConfig, io: &ConsoleIo) -> Result<Exit, VmError> {
    run_watched(kvm, cfg, io, None)
}

/// [`run`], telling `watcher` when the VM starts and stops.
pub fn run_watched(kvm: &Kvm, cfg: &VmConfig, io: &ConsoleIo, watcher: Option<&dyn Watcher>) -> Result<Exit, VmError> {
    let t0 = std::time::Instant::now();
    let ms = || t0.elapsed().as_secs_f64() * 1e3;
    // The set-up lines of the first boots only: a guest that reboots in a
    // loop must not repeat them forever.
    let chatty = throttles::BOOTS.hit().is_some();
    let ram = memory::create(cfg.memory, memory::Backing::for_config(cfg))?;
    // Reading the kernel and initramfs into guest RAM is the longest step
    // of set-up (the first touch of each page allocates and zeroes it): a
    // second thread does it while this one builds the VM and its devices.
    let loader = spawn_loader(cfg, &ram, t0, chatty)?;
    let vm = create_vm(kvm, &ram)?;
    if chatty {
        log::debug!("{:7.1} ms: VM, irqchip, PIT, {} MiB of guest RAM", ms(), cfg.memory >> 20);
    }

    let control = Control::new().map_err(|source| VmError::EventFd { what: "control", source })?;
    let pio = Bus::new();
    let mmio = Bus::new();
    let serial = attach_platform(&vm, &pio, &control, io)?;
    let ged = attach_ged(&vm, &pio)?;

    // PCI and the virtio devices behind it. The routing table starts with
    // KVM's default IOAPIC/PIC routes, which the serial irqfd relies on.
    let msi = Arc::new(GsiRouter::new(vm.clone()));
    msi.install()?;
    let mut pci = PciHost::new(&pio, &mmio, vm.clone(), msi)?;
    let runtime = Runtime::with_seccomp(cfg.threads, cfg.seccomp);
    let devs = devices::build(cfg)?;
    let plugged = devices::plug(&mut pci, devs, &ram.mem, &runtime)?;

    if chatty {
        log::debug!("{:7.1} ms: devices", ms());
    }
    let (kernel, initrd) = loader
        .join()
        .map_err(|_| VmError::Host(format!("the kernel loader failed on {} (a bug: please report it)", cfg.kernel.display())))??;
    write_acpi(&ram.mem, &AcpiConfig { cpus: cfg.cpus, pci_hotplug: cfg.pci_hotplug, pci_aml: Vec::new() })?;
    boot::write_boot_structures(&ram.mem, &kernel, &cfg.cmdline, initrd, cfg.memory)?;

    if chatty {
        log::debug!("{:7.1} ms: ACPI and boot tables", ms());
    }
    let vcpus = start_vcpus(kvm, &vm, cfg, kernel.entry(), &pio, &mmio, &control)?;
    if chatty {
        log::info!("VM set up in {:.1} ms", ms());
    }
    if let Some(stdin) = &io.stdin {
        stdin.set_target(Some(serial as Arc<Mutex<dyn InputSink>>));
    }
    let live = Arc::new(LiveVm {
        control: control.clone(),
        ged,
        mem: ram.mem.clone(),
        runtime,
        pci: Mutex::new(Some(pci)),
        devices: Mutex::new(plugged.into_iter().enumerate().map(|(i, d)| ((i + 1) as u8, d)).collect()),
    });
    if let Some(w) = watcher {
        w.started(&live);
    }

    let exit = control.wait();
    if let Some(stdin) = &io.stdin {
        stdin.set_target(None);
    }
    // No vCPU may touch a device, and no queue thread guest memory, once
    // they are gone: vCPUs first, then the devices' queue threads, then RAM.
    drop(vcpus);
    if let Some(w) = watcher {
        w.stopped(&exit);
    }
    let pci = lock(&live.pci).take();
    let plugged: Vec<_> = live.devices().into_iter().map(|(_, d)| d).collect();
    // What the guest got wrong, now that no vCPU adds to it; at every
    // final exit, and at the reboots whose set-up was logged.
    if chatty || !matches!(exit, Exit::Reset | Exit::TripleFault) {
        report_guest_errors(&plugged);
        report_counters(&plugged);
        report_queue_counters(&plugged);
    }
    drop(plugged);
    drop(pci);
    drop(live);
    drop(ram);
    Ok(exit)
}

/// One info line per device whose guest made mistakes (queue errors,
/// transport errors by kind, DEVICE_NEEDS_RESET), and one for the
/// VM-wide counts.
pub(crate) fn report_guest_errors(devices: &[Arc<Mutex<pci::VirtioPciDevice>>]) {
    for d in devices {
        let d = d.lock().unwrap_or_else(|e| e.into_inner());
        let errors = d.guest_errors();
        if !errors.is_clean() {
            log::info!("{}: guest errors: {errors}", d.name());
        }
    }
    throttles::report();
}

/// One info line per device with what its queues did (summed over the
/// queues), and its DEVICE_NEEDS_RESET bit: the short form of the API's
/// `vm.counters`.
pub(crate) fn report_counters(devices: &[Arc<Mutex<pci::VirtioPciDevice>>]) {
    if !log::log_enabled!(log::Level::Info) {
        return;
    }
    for d in devices {
        let d = d.lock().unwrap_or_else(|e| e.into_inner());
        let state = d.state();
        let t = state.total();
        let needs_reset = state.needs_reset.load(Ordering::Relaxed);
        log::info!(
            "{}: {} queues: {} kicks, {} chains, {} bytes, {} interrupts ({} suppressed), {} errors{}",
            d.name(),
            state.queues.len(),
            t.kicks,
            t.chains,
            t.bytes,
            t.interrupts,
            t.suppressed,
            t.errors,
            if needs_reset { ", needs reset" } else { "" }
        );
    }
}

/// At debug level, one line per device with each queue's counters, so a
/// long run (scripts/soak.sh) can show what each queue moved and that
/// none counted an error.
fn report_queue_counters(devices: &[Arc<Mutex<pci::VirtioPciDevice>>]) {
    if !log::log_enabled!(log::Level::Debug) {
        return;
    }
    for d in devices {
        let d = d.lock().unwrap_or_else(|e| e.into_inner());
        let state = d.state();
        let queues: Vec<String> = (0..state.queues.len())
            .map(|i| {
                let q = state.queue(i);
                format!("q{i} kicks={} chains={} bytes={} errors={}", q.kicks, q.chains, q.bytes, q.errors)
            })
            .collect();
        log::debug!("{}: queue counters: {}", d.name(), queues.join("; "));
    }
}

type Loaded = (boot::Kernel, Option<(u64, u64)>);

/// Starts loading the kernel and initramfs into `ram` on a thread of its own.
fn spawn_loader(
    cfg: &VmConfig,
    ram: &memory::GuestRam,
    t0: std::time::Instant,
    chatty: bool,
) -> Result<std::thread::JoinHandle<Result<Loaded, VmError>>, VmError> {
    let (mem, low_end) = (ram.mem.clone(), ram.low_end());
    let (kernel, initrd, in_guest) = (cfg.kernel.clone(), cfg.initrd.clone(), cfg.decompress_in_guest);
    let cfg_kernel = kernel.clone();
    std::thread::Builder::new()
        .name("kickvm-load".into())
        .spawn(move || {
            let boot::Loaded { kernel, initrd, how } = boot::load_with_initrd(&mem, &kernel, initrd.as_deref(), low_end, in_guest)?;
            if chatty {
                if let Some(how) = how {
                    log::debug!("kernel {}: {how}", cfg_kernel.display());
                }
                log::debug!("{:7.1} ms: kernel and initrd loaded", t0.elapsed().as_secs_f64() * 1e3);
            }
            Ok((kernel, initrd))
        })
        .map_err(|e| VmError::Host(format!("cannot start the kernel loader thread: {e}")))
}

/// The VM with its TSS, in-kernel interrupt controllers and PIT, and
/// `ram` as its memory.
fn create_vm(kvm: &Kvm, ram: &memory::GuestRam) -> Result<Arc<VmFd>, VmError> {
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("cannot create a VM"))?);
    vm.set_tss_address(KVM_TSS_ADDRESS).map_err(kvm_err("cannot set the TSS address"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(kvm_err("cannot set the identity map address"))?;
    vm.create_irq_chip().map_err(kvm_err("cannot create the in-kernel irqchip"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(kvm_err("cannot create the in-kernel PIT"))?;
    ram.register(&vm).map_err(kvm_err("cannot give guest memory to KVM"))?;
    Ok(vm)
}

/// COM1 (irqfd on GSI 4), the i8042 reset port, the ACPI sleep register.
fn attach_platform(
    vm: &VmFd,
    pio: &Bus,
    control: &Arc<Control>,
    io: &ConsoleIo,
) -> Result<Arc<Mutex<SerialPort>>, VmError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|source| VmError::EventFd { what: "serial interrupt", source })?;
    vm.register_irqfd(&irq, layout::SERIAL_IRQ).map_err(kvm_err("cannot attach the serial port's irqfd"))?;
    let serial = Arc::new(Mutex::new(SerialPort::new(irq, (io.serial_out)())));
    pio.insert(serial.clone(), layout::SERIAL_PORT, 8)?;
    pio.insert(Arc::new(Mutex::new(I8042::new(control.clone()))), layout::I8042_PORT - 4, 5)?;
    pio.insert(Arc::new(Mutex::new(AcpiSleep::new(control.clone()))), layout::ACPI_SLEEP_PORT, 1)?;
    Ok(serial)
}

/// The Generic Event Device: its event register on the I/O bus, its
/// level-triggered interrupt driven with `KVM_IRQ_LINE`.
fn attach_ged(vm: &Arc<VmFd>, pio: &Bus) -> Result<Arc<Ged>, VmError> {
    let line = vm.clone();
    let ged = Ged::new(Box::new(move |up| {
        line.set_irq_line(layout::GED_GSI, up).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }));
    pio.insert(Arc::new(Mutex::new(GedRegister(ged.clone()))), layout::GED_EVENT_PORT, 1)?;
    Ok(ged)
}

fn write_acpi(mem: &kickvm_virtio::GuestMemory, cfg: &AcpiConfig) -> Result<(), VmError> {
    for (addr, bytes) in acpi::build(cfg) {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|e| VmError::Boot(BootError::Write(format!("ACPI tables: {e}"))))?;
    }
    Ok(())
}

/// Creates, configures and starts every vCPU. Creating them needs nothing
/// of the kernel, but it is done after the loader: done while the loader
/// worked (2026-12-06), it gained nothing measurable, and two test runs
/// with it had a rig guest triple-fault in its first seconds
/// (`many_vms_boot_and_power_off_cleanly`; cause not found, docs/benchmarks.md).
fn start_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    cfg: &VmConfig,
    entry: boot::Entry,
    pio: &Bus,
    mmio: &Bus,
    control: &Arc<Control>,
) -> Result<Vcpus, VmError> {
    let (count, seccomp) = (cfg.cpus, cfg.seccomp);
    kickvm_virtio::sys::install_wake_handler();
    crate::vcpu_dump::prepare(&cfg.kernel);
    let mut base = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("cannot read the CPUID KVM supports"))?;
    cpuid::ensure_topology_leaves(&mut base);
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    // Configure every vCPU before any runs, so an AP is ready when the
    // boot vCPU sends it INIT/SIPI.
    let mut fds = Vec::new();
    for id in 0..u32::from(count) {
        let fd = vm.create_vcpu(u64::from(id)).map_err(|err| VcpuError::Create { id, err })?;
        let mut c = base.clone();
        cpuid::patch(&mut c, id, u32::from(count), tsc_deadline);
        vcpu::configure(&fd, id, &c)?;
        if id == 0 {
            vcpu::set_boot_state(&fd, entry)?;
        }
        fds.push(fd);
    }
    let mut vcpus = Vcpus { stop: Arc::new(AtomicBool::new(false)), threads: Vec::new() };
    let dumps_since = crate::vcpu_dump::requests();
    for (id, fd) in fds.into_iter().enumerate() {
        let t = VcpuThread::spawn(id as u32, fd, pio.clone(), mmio.clone(), control.clone(), vcpus.stop.clone(), seccomp, dumps_since)?;
        vcpus.threads.push(t);
    }
    Ok(vcpus)
}
