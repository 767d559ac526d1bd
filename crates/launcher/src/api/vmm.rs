//! The VMM behind the API: at most one VM, its configuration (Cloud
//! Hypervisor's shape, as created), and — once booted — the thread that
//! runs it with the launcher's own [`vm::run_until_stopped`].
//!
//! States as Cloud Hypervisor names them: no VM; `Created` (configured,
//! never booted); `Running`; `Shutdown` (stopped by `vm.shutdown` or the
//! guest's power-off; `vm.boot` starts it again from the same
//! configuration).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::hotplug::{build_added, check_added, Added};
use super::http::{Request, Response};
use super::schema::{ChVmConfig, Disk, HostOptions, Net, RemoveDevice, Resize, SerialTarget};
use crate::config::{ConfigError, TapFds, VmConfig};
use crate::platform::Exit;
use crate::vm::{self, ConsoleIo, LiveVm, Watcher};

/// How long `vm.boot` waits for the VM to be set up (its vCPUs started).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `vm.shutdown` / `vmm.shutdown` wait for the VM to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `vm.remove-device` waits for the guest to eject the device
/// (Linux unbinds the driver first; under the rig's TCG that takes a few
/// seconds).
const REMOVE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the API can do to the VM while it runs.
struct Live {
    vm: Arc<LiveVm>,
}

/// The configured VM.
struct Created {
    ch: ChVmConfig,
    tap_fds: TapFds,
    booted: bool,
}

pub struct Vmm {
    host: HostOptions,
    inner: Mutex<Option<Created>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    live: Arc<Mutex<Option<Live>>>,
    /// The configuration with the devices plugged in since `vm.boot`: the
    /// VM thread builds the VM from it after a guest reset.
    next_boot: Arc<Mutex<Option<VmConfig>>>,
    /// Set by `vmm.shutdown`: the server exits after answering.
    pub exit: AtomicBool,
}

/// Tells the API what the VM thread's VM is doing.
struct ApiWatcher {
    live: Arc<Mutex<Option<Live>>>,
    booted: Mutex<Option<mpsc::Sender<Result<(), String>>>>,
    next_boot: Arc<Mutex<Option<VmConfig>>>,
}

impl Watcher for ApiWatcher {
    fn started(&self, vm: &Arc<LiveVm>) {
        *lock(&self.live) = Some(Live { vm: vm.clone() });
        if let Some(tx) = lock(&self.booted).take() {
            let _ = tx.send(Ok(()));
        }
    }
    fn stopped(&self, _exit: &Exit) {
        *lock(&self.live) = None;
    }
    fn config(&self) -> Option<VmConfig> {
        lock(&self.next_boot).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn bad(e: ConfigError) -> Response {
    Response::error(400, e)
}

fn conflict(msg: &str) -> Response {
    Response::error(409, msg)
}

const NO_VM: &str = "no VM is created: PUT vm.create first";

impl Vmm {
    pub fn new(host: HostOptions) -> Vmm {
        Vmm {
            host,
            inner: Mutex::new(None),
            thread: Mutex::new(None),
            live: Arc::new(Mutex::new(None)),
            next_boot: Arc::new(Mutex::new(None)),
            exit: AtomicBool::new(false),
        }
    }

    fn running(&self) -> bool {
        lock(&self.thread).as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Answers one request. `vmm.shutdown` also sets [`Vmm::exit`].
    pub fn handle(&self, req: Request) -> Response {
        let Some(action) = req.path.strip_prefix("/api/v1/") else {
            return Response::error(404, format!("{}: not found; kickvm serves /api/v1/vmm.* and /api/v1/vm.*", req.path));
        };
        let action = action.split('?').next().unwrap_or("");
        let want = match action {
            "vmm.ping" | "vm.info" | "vm.counters" => "GET",
            "vm.create" | "vm.boot" | "vm.shutdown" | "vm.reboot" | "vm.power-button" | "vm.delete" | "vm.add-net"
            | "vm.add-disk" | "vm.remove-device" | "vm.resize" | "vmm.shutdown" => "PUT",
            _ => return Response::error(404, format!("{action}: unknown endpoint (see docs/api.md for the list)")),
        };
        if req.method != want {
            return Response::error(405, format!("{action} takes {want}, not {}", req.method));
        }
        // A body is JSON: said so, or not said at all (ch-remote sends no
        // Content-Type); any other type is a client's mistake (curl -d
        // alone says application/x-www-form-urlencoded).
        if !req.body.is_empty() && req.content_type.as_deref().is_some_and(|c| !c.starts_with("application/json")) {
            return Response::error(415, format!("{action}: send the body as Content-Type: application/json"));
        }
        match action {
            "vmm.ping" => self.ping(),
            "vm.info" => self.info(),
            "vm.counters" => self.counters(),
            "vm.create" => self.create(&req.body),
            "vm.boot" => self.boot(),
            "vm.shutdown" => self.shutdown(),
            "vm.reboot" => self.signal(Exit::Reset),
            "vm.power-button" => self.power_button(),
            "vm.delete" => self.delete(),
            "vm.add-net" => self.add_net(&req.body, req.fds),
            "vm.add-disk" => self.add_disk(&req.body),
            "vm.remove-device" => self.remove_device(&req.body),
            "vm.resize" => self.resize(&req.body),
            _ => self.exit_vmm(),
        }
    }

    fn ping(&self) -> Response {
        let v = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "build_version": concat!("kickvm ", env!("CARGO_PKG_VERSION")),
            "pid": std::process::id(),
            "features": [],
        });
        Response::json(200, v.to_string())
    }

    fn create(&self, body: &[u8]) -> Response {
        let mut inner = lock(&self.inner);
        if inner.is_some() {
            return conflict("vm.create: a VM is already created; PUT vm.delete first to replace it");
        }
        if body.is_empty() {
            return Response::error(400, "vm.create needs a body: the VM's configuration as JSON");
        }
        let ch = match ChVmConfig::from_json(body) {
            Ok(c) => c,
            Err(e) => return bad(e),
        };
        if let Err(e) = self.checked(&ch, &TapFds::default()) {
            return bad(e);
        }
        *inner = Some(Created { ch, tap_fds: TapFds::default(), booted: false });
        Response::no_content()
    }

    /// The launcher's configuration for `ch`, checked as `kickvm run`
    /// checks its options.
    fn checked(&self, ch: &ChVmConfig, fds: &TapFds) -> Result<(VmConfig, SerialTarget), ConfigError> {
        let (cfg, serial) = ch.to_config(&self.host, fds)?;
        cfg.validate()?;
        if let SerialTarget::File(p) = &serial {
            crate::config::validate::check_new_file_dir("serial file", p)?;
        }
        Ok((cfg, serial))
    }

    fn info(&self) -> Response {
        let inner = lock(&self.inner);
        let Some(c) = inner.as_ref() else { return Response::error(409, NO_VM) };
        let state = if self.running() {
            "Running"
        } else if c.booted {
            "Shutdown"
        } else {
            "Created"
        };
        let mut tree = Map::new();
        // Where the devices are: on the running VM's bus (hot-plugged ones
        // included), else where the next boot puts them.
        let slots: Vec<(String, usize)> = match lock(&self.live).as_ref() {
            Some(l) => l.vm.devices().into_iter().map(|(slot, d)| (lock(&d).name().to_string(), usize::from(slot))).collect(),
            None => device_ids(&c.ch).into_iter().enumerate().map(|(i, id)| (id, i + 1)).collect(),
        };
        for (id, slot) in slots {
            tree.insert(id.clone(), json!({ "id": id, "pci_bdf": bdf(slot) }));
        }
        let v = json!({
            "config": c.ch,
            "state": state,
            "memory_actual_size": c.ch.memory.size,
            "device_tree": tree,
        });
        Response::json(200, v.to_string())
    }

    fn boot(&self) -> Response {
        let mut inner = lock(&self.inner);
        let Some(c) = inner.as_mut() else { return Response::error(409, NO_VM) };
        if self.running() {
            return conflict("vm.boot: the VM is already running");
        }
        let (cfg, serial) = match self.checked(&c.ch, &c.tap_fds) {
            Ok(x) => x,
            Err(e) => return bad(e),
        };
        let kvm = match vm::open_kvm(&cfg.kvm_device, cfg.allow_slow_kvm).and_then(|k| vm::check_limits(&k, &cfg).map(|_| k)) {
            Ok(k) => k,
            Err(e) => return Response::error(500, format!("vm.boot: {e}")),
        };
        let (tx, rx) = mpsc::channel();
        *lock(&self.next_boot) = None;
        let watcher =
            ApiWatcher { live: self.live.clone(), booted: Mutex::new(Some(tx.clone())), next_boot: self.next_boot.clone() };
        let spawned = std::thread::Builder::new().name("kickvm-vm".into()).spawn(move || {
            let io = ConsoleIo { serial_out: serial_out(serial), stdin: None };
            match vm::run_until_stopped(&kvm, &cfg, &io, false, Some(&watcher)) {
                Ok(Exit::Error(msg)) => log::warn!("the VM stopped: {msg}"),
                Ok(exit) => log::info!("the VM stopped: {exit:?}"),
                Err(e) => {
                    log::warn!("the VM stopped: {e}");
                    let _ = tx.send(Err(e.to_string()));
                }
            }
            *lock(&watcher.live) = None;
        });
        let handle = match spawned {
            Ok(h) => h,
            Err(e) => return Response::error(500, format!("vm.boot: cannot start the VM thread: {e}")),
        };
        *lock(&self.thread) = Some(handle);
        c.booted = true;
        match rx.recv_timeout(BOOT_TIMEOUT) {
            Ok(Ok(())) => Response::no_content(),
            Ok(Err(e)) => Response::error(500, format!("vm.boot: {e}")),
            Err(_) => Response::error(500, "vm.boot: the VM was not set up within 60 s; see kickvm's log"),
        }
    }

    /// Asks the running VM to stop for `why`; when it is between two boots
    /// (a guest reset), asks the next one.
    fn request(&self, why: Exit) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < STOP_TIMEOUT {
            if let Some(l) = lock(&self.live).as_ref() {
                l.vm.control.request(why);
                return true;
            }
            if !self.running() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn signal(&self, why: Exit) -> Response {
        if lock(&self.inner).is_none() {
            return Response::error(409, NO_VM);
        }
        if !self.running() || !self.request(why) {
            return conflict("the VM is not running: PUT vm.boot first");
        }
        Response::no_content()
    }

    /// Stops the VM and waits for its thread (vCPUs, queue threads, TAPs
    /// and files all closed by then).
    fn stop(&self) -> bool {
        if !self.running() {
            return false;
        }
        self.request(Exit::PowerOff);
        let t0 = Instant::now();
        while self.running() && t0.elapsed() < STOP_TIMEOUT {
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(t) = lock(&self.thread).take_if(|t| t.is_finished()) {
            let _ = t.join();
        }
        true
    }

    fn shutdown(&self) -> Response {
        if lock(&self.inner).is_none() {
            return Response::error(409, NO_VM);
        }
        if !self.stop() {
            return conflict("vm.shutdown: the VM is not running");
        }
        Response::no_content()
    }

    fn delete(&self) -> Response {
        self.stop();
        *lock(&self.inner) = None;
        Response::no_content()
    }

    fn exit_vmm(&self) -> Response {
        let t0 = Instant::now();
        if self.stop() {
            log::info!("vmm.shutdown: the VM stopped in {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
        }
        self.exit.store(true, Ordering::SeqCst);
        Response::no_content()
    }

    /// Presses the running VM's power button (ACPI): the guest decides
    /// what to do (Linux's default: power off).
    fn power_button(&self) -> Response {
        if lock(&self.inner).is_none() {
            return Response::error(409, NO_VM);
        }
        let live = lock(&self.live).as_ref().map(|l| l.vm.clone());
        match live {
            Some(vm) => match vm.press_power_button() {
                Ok(()) => Response::no_content(),
                Err(e) => Response::error(500, format!("vm.power-button: {e}")),
            },
            None => conflict("vm.power-button: the VM is not running: PUT vm.boot first"),
        }
    }

    /// Runs `change` on a copy of the configuration and keeps the copy if
    /// it still passes the checks. While the VM runs, the new device is
    /// also built and plugged into it (PCI hotplug); it stays in the
    /// configuration for the VM's reboots and next boots.
    fn reconfigure(
        &self,
        what: &str,
        added: Added,
        change: impl FnOnce(&mut Created) -> Result<String, ConfigError>,
    ) -> Response {
        let mut inner = lock(&self.inner);
        let Some(c) = inner.as_mut() else { return Response::error(409, NO_VM) };
        let mut next = Created { ch: c.ch.clone(), tap_fds: c.tap_fds.clone(), booted: c.booted };
        let id = match change(&mut next) {
            Ok(id) => id,
            Err(e) => return bad(e),
        };
        let live = lock(&self.live).as_ref().map(|l| l.vm.clone());
        let checked = match live {
            Some(_) => next.ch.to_config(&self.host, &next.tap_fds).and_then(|(cfg, _)| check_added(&cfg, added).map(|_| cfg)),
            None => self.checked(&next.ch, &next.tap_fds).map(|(cfg, _)| cfg),
        };
        let cfg = match checked {
            Ok(cfg) => cfg,
            Err(e) => return bad(e),
        };
        let slot = match live {
            Some(vm) => {
                let t0 = Instant::now();
                let plugged = build_added(&cfg, added).and_then(|d| vm.hotplug(d).map_err(|e| e.to_string()));
                match plugged {
                    Ok(slot) => {
                        log::info!("{what}: {id} plugged into slot {slot} in {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
                        usize::from(slot)
                    }
                    Err(e) => return Response::error(500, format!("{what}: {e}")),
                }
            }
            None => device_ids(&next.ch).iter().position(|d| *d == id).map_or(0, |i| i + 1),
        };
        if self.running() {
            *lock(&self.next_boot) = Some(cfg);
        }
        *c = next;
        Response::json(200, json!({ "id": id, "bdf": bdf(slot) }).to_string())
    }

    fn add_disk(&self, body: &[u8]) -> Response {
        let disk: Disk = match parse_body(body, "vm.add-disk") {
            Ok(d) => d,
            Err(r) => return r,
        };
        self.reconfigure("vm.add-disk", Added::Disk, |c| {
            c.ch.disks.push(disk);
            Ok(format!("blk{}", c.ch.disks.len() - 1))
        })
    }

    /// A card on a TAP named in the body, or on the TAP whose queue fds
    /// (one per queue pair) came with the request.
    fn add_net(&self, body: &[u8], fds: Vec<std::os::fd::OwnedFd>) -> Response {
        let mut net: Net = match parse_body(body, "vm.add-net") {
            Ok(n) => n,
            Err(r) => return r,
        };
        self.reconfigure("vm.add-net", Added::Net, move |c| {
            if !fds.is_empty() {
                let pairs = net.queue_pairs()?;
                if usize::from(pairs) != fds.len() {
                    return Err(ConfigError(format!(
                        "vm.add-net: {} fds passed for num_queues {} ({pairs} queue pairs): pass one TAP fd per pair",
                        fds.len(),
                        2 * pairs
                    )));
                }
                let taps = fds
                    .into_iter()
                    .map(|fd| kickvm_virtio::net::Tap::from_fd(fd).map(|t| (t.name().to_string(), t)))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ConfigError(format!("vm.add-net: {e}")))?;
                let name = taps[0].0.clone();
                if taps.iter().any(|(n, _)| *n != name) {
                    return Err(ConfigError("vm.add-net: the fds passed belong to different TAPs".into()));
                }
                let owned = taps.into_iter().map(|(_, t)| Arc::new(std::os::fd::OwnedFd::from(t))).collect();
                c.tap_fds.0.insert(name.clone(), owned);
                net.tap = Some(name);
            }
            net.fds = None;
            c.ch.net.push(net);
            Ok(format!("net{}", c.ch.net.len() - 1))
        })
    }

    /// Takes the last disk or the last card out of the running VM (the
    /// guest ejects it: PCI hotplug) and out of the configuration. Only the
    /// last of its kind: kickvm names devices by their place in the
    /// configuration (`blk1` is the second disk), so taking one from the
    /// middle would rename the ones after it.
    fn remove_device(&self, body: &[u8]) -> Response {
        let r: RemoveDevice = match parse_body(body, "vm.remove-device") {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        let mut inner = lock(&self.inner);
        let Some(c) = inner.as_mut() else { return Response::error(409, NO_VM) };
        let Some(vm) = lock(&self.live).as_ref().map(|l| l.vm.clone()) else {
            return conflict("vm.remove-device: the VM is not running: PUT vm.boot first (before boot, vm.delete and vm.create without it)");
        };
        let id = r.id.as_str();
        let last = match id.get(..3) {
            Some("blk") => c.ch.disks.len().checked_sub(1).map(|i| format!("blk{i}")),
            Some("net") => c.ch.net.len().checked_sub(1).map(|i| format!("net{i}")),
            _ => return bad(ConfigError(format!("vm.remove-device {id}: only disks (blkN) and cards (netN) can be removed"))),
        };
        if last.as_deref() != Some(id) {
            return bad(ConfigError(format!(
                "vm.remove-device {id}: only the last disk or card can be removed ({}), since kickvm names devices by their order",
                last.unwrap_or_else(|| "there is none".into())
            )));
        }
        let Some(slot) = vm.slot_of(id) else {
            return bad(ConfigError(format!("vm.remove-device {id}: the running VM has no such device (vm.info lists them)")));
        };
        let t0 = Instant::now();
        match vm.unplug(slot, REMOVE_TIMEOUT) {
            Ok(true) => {}
            Ok(false) => {
                return Response::error(504, format!(
                    "vm.remove-device {id}: the guest did not eject it within {} s (it needs ACPI PCI hotplug: Linux's acpiphp); it stays in the configuration, and leaves the VM if the guest ejects it later",
                    REMOVE_TIMEOUT.as_secs()
                ))
            }
            Err(e) => return Response::error(500, format!("vm.remove-device {id}: {e}")),
        }
        log::info!("vm.remove-device: {id} left slot {slot} in {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
        if id.starts_with("blk") {
            c.ch.disks.pop();
        } else if let Some(tap) = c.ch.net.pop().and_then(|n| n.tap) {
            c.tap_fds.0.remove(&tap);
        }
        if let Ok((cfg, _)) = c.ch.to_config(&self.host, &c.tap_fds) {
            *lock(&self.next_boot) = Some(cfg);
        }
        Response::no_content()
    }

    fn resize(&self, body: &[u8]) -> Response {
        let r: Resize = match parse_body(body, "vm.resize") {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        let mut inner = lock(&self.inner);
        let Some(c) = inner.as_mut() else { return Response::error(409, NO_VM) };
        let same_cpus = r.desired_vcpus.is_none_or(|n| n == c.ch.cpus.boot_vcpus);
        let same_ram = r.desired_ram.is_none_or(|n| n == c.ch.memory.size);
        if r.desired_balloon.is_some_and(|b| b > 0) {
            return bad(ConfigError("vm.resize: kickvm has no balloon; leave desired_balloon out".into()));
        }
        if same_cpus && same_ram {
            return Response::no_content();
        }
        if self.running() || c.booted {
            return conflict("vm.resize: kickvm cannot add or remove vCPUs or RAM of a booted VM (no hotplug); shut it down, vm.delete and vm.create it again with the new size");
        }
        let mut ch = c.ch.clone();
        if let Some(n) = r.desired_vcpus {
            if n > ch.cpus.max_vcpus {
                return bad(ConfigError(format!("vm.resize: desired_vcpus {n} is over max_vcpus {}", ch.cpus.max_vcpus)));
            }
            ch.cpus.boot_vcpus = n;
        }
        if let Some(m) = r.desired_ram {
            ch.memory.size = m;
        }
        if let Err(e) = self.checked(&ch, &c.tap_fds) {
            return bad(e);
        }
        c.ch = ch;
        Response::no_content()
    }

    /// Per device and queue: what the queue threads counted.
    fn counters(&self) -> Response {
        let live = lock(&self.live);
        let Some(l) = live.as_ref() else {
            return conflict("vm.counters: the VM is not running; counters exist while it runs");
        };
        let mut out = Map::new();
        for (_, d) in l.vm.devices() {
            let d = lock(&d);
            let state = d.state();
            let mut m = Map::new();
            for (i, q) in state.queues.iter().enumerate() {
                let s = q.snapshot();
                for (name, v) in [
                    ("kicks", s.kicks),
                    ("chains", s.chains),
                    ("bytes", s.bytes),
                    ("interrupts", s.interrupts),
                    ("interrupts_suppressed", s.suppressed),
                    ("errors", s.errors),
                ] {
                    m.insert(format!("q{i}_{name}"), Value::from(v));
                }
            }
            m.insert("needs_reset".into(), Value::from(u64::from(state.needs_reset.load(Ordering::Relaxed))));
            m.insert("transport_errors".into(), Value::from(d.guest_errors().transport_errors));
            out.insert(d.name().to_string(), Value::Object(m));
        }
        Response::json(200, Value::Object(out).to_string())
    }
}

/// A device body (`vm.add-disk`, `vm.add-net`, `vm.resize`), or the 400
/// saying why not.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, Response> {
    if body.is_empty() {
        return Err(Response::error(400, format!("{what} needs a JSON body")));
    }
    serde_json::from_slice(body).map_err(|e| Response::error(400, format!("{what}: body is not the expected JSON: {e}")))
}

/// The devices of `ch` in PCI slot order (as [`crate::devices::KINDS`]
/// builds them), by the names their threads and counters carry.
fn device_ids(ch: &ChVmConfig) -> Vec<String> {
    let mut ids: Vec<String> = (0..ch.disks.len()).map(|i| format!("blk{i}")).collect();
    ids.extend((0..ch.net.len()).map(|i| format!("net{i}")));
    if ch.console.mode != super::schema::ConsoleMode::Off {
        ids.push("console0".into());
    }
    ids.push("rng0".into());
    if ch.vsock.is_some() {
        ids.push("vsock0".into());
    }
    ids
}

/// A bus 0 PCI address as Cloud Hypervisor writes it.
fn bdf(slot: usize) -> String {
    format!("0000:00:{slot:02x}.0")
}

fn serial_out(target: SerialTarget) -> Box<dyn Fn() -> crate::serial::SerialOut + Send + Sync> {
    match target {
        SerialTarget::Stdout => Box::new(|| Box::new(std::io::stdout())),
        SerialTarget::Discard => Box::new(|| Box::new(std::io::sink())),
        SerialTarget::File(p) => Box::new(move || {
            match std::fs::OpenOptions::new().create(true).append(true).open(&p) {
                Ok(f) => Box::new(f),
                Err(e) => {
                    log::warn!("serial file {}: {e}; serial output is discarded", p.display());
                    Box::new(std::io::sink())
                }
            }
        }),
    }
}

impl Vmm {
    /// Stops the VM if one runs (the server is exiting).
    pub fn stop_for_exit(&self) {
        self.stop();
    }
}
