//! Cloud Hypervisor's JSON shapes for the parts of a VM kickvm builds, and
//! their translation into the launcher's own [`VmConfig`]: the API is one
//! more way to write the same configuration as `kickvm run`'s options, and
//! the same checks ([`VmConfig::validate`]) then apply.
//!
//! Field names and defaults follow Cloud Hypervisor's OpenAPI description
//! (`vmm/src/api/openapi/cloud-hypervisor.yaml`). Unknown fields are
//! ignored, as there; fields naming things kickvm does not have (virtio-fs,
//! pmem, VFIO, a firmware payload, vhost-user devices) are refused with one
//! line, never silently dropped.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{self, ConfigError, ConsoleSpec, DiskSpec, NetSpec, VmConfig};

/// `vm.create`'s body (and `vm.info`'s `config`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ChVmConfig {
    pub payload: Payload,
    pub cpus: Cpus,
    pub memory: Memory,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<Net>,
    pub rng: Rng,
    pub serial: Console,
    pub console: Console,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    /// Accepted and ignored: kickvm has one PCI segment and no IOMMU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iommu: Option<bool>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Payload {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firmware: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Cpus {
    pub boot_vcpus: u16,
    pub max_vcpus: u16,
    /// Accepted and ignored (kickvm gives each vCPU its own core).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topology: Option<serde_json::Value>,
}

impl Default for Cpus {
    fn default() -> Self {
        Cpus { boot_vcpus: 1, max_vcpus: 1, topology: None }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Memory {
    /// Bytes.
    pub size: u64,
    pub shared: bool,
    pub hugepages: bool,
    /// Accepted only when 0: kickvm has no memory hotplug.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<u64>,
}

impl Default for Memory {
    fn default() -> Self {
        Memory { size: config::DEFAULT_MEMORY, shared: false, hugepages: false, hotplug_size: None }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Disk {
    pub path: Option<PathBuf>,
    pub readonly: bool,
    pub num_queues: Option<u16>,
    /// Accepted and ignored: the guest driver picks the ring size (up to
    /// the device's maximum).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub vhost_user: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Net {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Queues, not pairs (Cloud Hypervisor's unit): 2 per queue pair.
    pub num_queues: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub vhost_user: bool,
    /// Never taken from the body: descriptors come over the socket.
    #[serde(skip_serializing)]
    pub fds: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Rng {
    pub src: PathBuf,
}

impl Default for Rng {
    fn default() -> Self {
        Rng { src: PathBuf::from("/dev/urandom") }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ConsoleMode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    #[default]
    Null,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Console {
    pub mode: ConsoleMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Vsock {
    pub cid: u64,
    pub socket: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// `vm.resize`'s body.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Resize {
    pub desired_vcpus: Option<u16>,
    pub desired_ram: Option<u64>,
    pub desired_balloon: Option<u64>,
}

/// `vm.remove-device`'s body: the id `vm.add-*` answered (`blk1`, `net0`).
#[derive(Debug, Clone, Deserialize)]
pub struct RemoveDevice {
    pub id: String,
}

/// Top-level `vm.create` fields for devices kickvm does not have.
const REFUSED: &[(&str, &str)] = &[
    ("fs", "virtio-fs"),
    ("pmem", "virtio-pmem"),
    ("devices", "VFIO devices"),
    ("user_devices", "vfio-user devices"),
    ("vdpa", "vDPA devices"),
    ("balloon", "virtio-balloon"),
    ("sgx_epc", "SGX"),
    ("numa", "NUMA nodes"),
    ("tpm", "a TPM"),
    ("watchdog", "a watchdog"),
    ("pvpanic", "pvpanic"),
];

/// Where COM1's output goes: `serial.mode` has no place in [`VmConfig`]
/// (the launcher keeps it with the console I/O that outlives one VM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    Stdout,
    Discard,
    File(PathBuf),
}

/// The host-side choices an API user cannot make: they come from
/// `kickvm --api-socket`'s own options.
#[derive(Debug, Clone)]
pub struct HostOptions {
    pub threads: kickvm_virtio::ThreadingMode,
    pub seccomp: kickvm_virtio::seccomp::SeccompMode,
    pub decompress_in_guest: bool,
    pub kvm_device: PathBuf,
    pub allow_slow_kvm: bool,
}

fn refuse<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

impl ChVmConfig {
    /// Parses a `vm.create` body: JSON errors and refused fields as one line.
    pub fn from_json(body: &[u8]) -> Result<ChVmConfig, ConfigError> {
        let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| ConfigError(format!("body is not valid JSON: {e}")))?;
        if let Some(obj) = v.as_object() {
            for (key, what) in REFUSED {
                if obj.get(*key).is_some_and(|x| !x.is_null()) {
                    return refuse(format!("`{key}`: kickvm has no {what}; remove it from the configuration"));
                }
            }
        }
        serde_json::from_value(v).map_err(|e| ConfigError(format!("configuration does not fit Cloud Hypervisor's VmConfig: {e}")))
    }

    /// The launcher's configuration for this VM, and where COM1 writes.
    /// `tap_fds` are the TAP descriptors handed over with `vm.add-net`.
    pub fn to_config(&self, host: &HostOptions, tap_fds: &config::TapFds) -> Result<(VmConfig, SerialTarget), ConfigError> {
        if self.payload.firmware.is_some() {
            return refuse("payload.firmware: kickvm boots a Linux kernel directly; give payload.kernel instead");
        }
        let Some(kernel) = self.payload.kernel.clone() else {
            return refuse("payload.kernel is missing: give the path of a bzImage (and payload.initramfs)");
        };
        let cpus = &self.cpus;
        let Ok(boot) = u8::try_from(cpus.boot_vcpus) else {
            return refuse(format!("cpus.boot_vcpus {}: use a number from 1 to {}", cpus.boot_vcpus, config::MAX_CPUS));
        };
        if cpus.max_vcpus < cpus.boot_vcpus {
            return refuse(format!("cpus.max_vcpus {} is below boot_vcpus {}", cpus.max_vcpus, cpus.boot_vcpus));
        }
        if self.memory.hotplug_size.is_some_and(|n| n > 0) {
            return refuse("memory.hotplug_size: kickvm has no memory hotplug; leave it out or 0");
        }
        if self.rng.src != std::path::Path::new("/dev/urandom") {
            return refuse(format!("rng.src {}: kickvm's virtio-rng reads /dev/urandom only", self.rng.src.display()));
        }
        let disks = self.disks.iter().map(Disk::to_spec).collect::<Result<Vec<_>, _>>()?;
        let nets = self.net.iter().map(Net::to_spec).collect::<Result<Vec<_>, _>>()?;
        let vsock = self.vsock.as_ref().map(Vsock::to_spec).transpose()?;
        let cfg = VmConfig {
            kernel,
            initrd: self.payload.initramfs.clone(),
            cmdline: config::full_cmdline(self.payload.cmdline.as_deref()),
            decompress_in_guest: host.decompress_in_guest,
            memory: self.memory.size,
            cpus: boot,
            hugepages: self.memory.hugepages,
            memory_shared: self.memory.shared,
            nets,
            disks,
            console: self.console.virtio_console()?,
            rng: true,
            vsock,
            vhost_users: Vec::new(),
            threads: host.threads,
            kvm_device: host.kvm_device.clone(),
            allow_slow_kvm: host.allow_slow_kvm,
            seccomp: host.seccomp,
            tap_fds: tap_fds.clone(),
            pci_hotplug: true,
        };
        Ok((cfg, self.serial.serial_target()?))
    }
}

impl Disk {
    fn to_spec(&self) -> Result<DiskSpec, ConfigError> {
        if self.vhost_user {
            return refuse("disks: vhost_user disks are not taken over the API; serve the file itself with `path`");
        }
        let Some(path) = self.path.clone() else {
            return refuse("disks: a disk without `path`; give the image file's path");
        };
        let queues = self.num_queues.unwrap_or(1);
        if queues == 0 || queues > config::MAX_QUEUES {
            return refuse(format!("disk {}: num_queues {queues}: use 1 to {}", path.display(), config::MAX_QUEUES));
        }
        if let Some(s) = &self.serial {
            if s.len() > config::MAX_SERIAL {
                return refuse(format!("disk {}: serial is over {} bytes", path.display(), config::MAX_SERIAL));
            }
        }
        Ok(DiskSpec { path, readonly: self.readonly, serial: self.serial.clone(), queues, poll: kickvm_virtio::options::DEFAULT_POLL })
    }
}

impl Net {
    /// Queue pairs asked for (Cloud Hypervisor counts queues: 2 per pair).
    pub fn queue_pairs(&self) -> Result<u16, ConfigError> {
        let q = self.num_queues.unwrap_or(2);
        if q < 2 || !q.is_multiple_of(2) || q / 2 > config::MAX_QUEUES {
            return refuse(format!("net: num_queues {q}: use an even number from 2 to {}", 2 * config::MAX_QUEUES));
        }
        Ok(q / 2)
    }

    fn to_spec(&self) -> Result<NetSpec, ConfigError> {
        if self.vhost_user {
            return refuse("net: vhost_user cards are not taken over the API; pass a TAP (`tap` or its fd)");
        }
        let queues = self.queue_pairs()?;
        let mut opts = vec![format!("tap={}", self.tap.as_deref().unwrap_or(""))];
        if let Some(mac) = &self.mac {
            opts.push(format!("mac={mac}"));
        }
        opts.push(format!("queues={queues}"));
        if self.tap.as_deref().unwrap_or("").is_empty() {
            return refuse("net: give `tap` (an interface name) or pass the TAP's fds with vm.add-net");
        }
        config::parse_net(&opts.join(",")).map_err(|e| ConfigError(format!("net: {}", e.0)))
    }
}

impl Vsock {
    fn to_spec(&self) -> Result<config::VsockSpec, ConfigError> {
        use kickvm_virtio::vsock::{MAX_GUEST_CID, MIN_GUEST_CID};
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&self.cid) {
            return refuse(format!(
                "vsock.cid {}: use a number from {MIN_GUEST_CID} to {MAX_GUEST_CID} (0-2 are the hypervisor, loopback and host)",
                self.cid
            ));
        }
        if self.socket.as_os_str().is_empty() {
            return refuse("vsock.socket: give the path of the Unix socket host programs connect to");
        }
        Ok(config::VsockSpec { cid: self.cid, socket: self.socket.clone() })
    }
}

impl Console {
    fn virtio_console(&self) -> Result<ConsoleSpec, ConfigError> {
        Ok(match self.mode {
            ConsoleMode::Off => ConsoleSpec::None,
            ConsoleMode::Null => ConsoleSpec::File("/dev/null".into()),
            ConsoleMode::Tty => ConsoleSpec::Stdio,
            ConsoleMode::Pty => ConsoleSpec::Pty,
            ConsoleMode::File => match &self.file {
                Some(f) => ConsoleSpec::File(f.clone()),
                None => return refuse("console: mode File needs `file`"),
            },
            ConsoleMode::Socket => match &self.socket {
                Some(s) => ConsoleSpec::Socket(s.clone()),
                None => return refuse("console: mode Socket needs `socket`"),
            },
        })
    }

    fn serial_target(&self) -> Result<SerialTarget, ConfigError> {
        Ok(match self.mode {
            ConsoleMode::Off | ConsoleMode::Null => SerialTarget::Discard,
            ConsoleMode::Tty => SerialTarget::Stdout,
            ConsoleMode::File => match &self.file {
                Some(f) => SerialTarget::File(f.clone()),
                None => return refuse("serial: mode File needs `file`"),
            },
            ConsoleMode::Pty | ConsoleMode::Socket => {
                return refuse("serial: kickvm's serial port writes to Tty, File, Null or Off; use console for a Pty or Socket")
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostOptions {
        HostOptions {
            threads: kickvm_virtio::ThreadingMode::PerQueue,
            seccomp: kickvm_virtio::seccomp::SeccompMode::On,
            decompress_in_guest: false,
            kvm_device: "/dev/kvm".into(),
            allow_slow_kvm: false,
        }
    }

    fn convert(json: &str) -> Result<(VmConfig, SerialTarget), ConfigError> {
        ChVmConfig::from_json(json.as_bytes())?.to_config(&host(), &Default::default())
    }

    #[test]
    fn cloud_hypervisor_shapes_become_the_same_vm_config() {
        let (c, serial) = convert(
            r#"{"payload":{"kernel":"/k","initramfs":"/i","cmdline":"quiet"},"cpus":{"boot_vcpus":2,"max_vcpus":4},
                "memory":{"size":268435456,"shared":true},"disks":[{"path":"/d","readonly":true,"num_queues":2}],
                "net":[{"tap":"tap7","mac":"52:54:00:00:00:07","num_queues":4}],"serial":{"mode":"Tty"},
                "console":{"mode":"Off"},"platform":{"num_pci_segments":1},"something_new":[1,2]}"#,
        )
        .unwrap();
        assert_eq!((c.cpus, c.memory, c.memory_shared), (2, 256 << 20, true));
        assert_eq!(c.initrd, Some(PathBuf::from("/i")));
        assert!(c.cmdline.starts_with(config::DEFAULT_CMDLINE) && c.cmdline.ends_with(" quiet"));
        assert_eq!(c.disks, vec![DiskSpec { path: "/d".into(), readonly: true, serial: None, queues: 2, poll: kickvm_virtio::options::DEFAULT_POLL }]);
        assert_eq!((c.nets[0].tap.as_str(), c.nets[0].queues, c.nets[0].mac), ("tap7", 2, Some([0x52, 0x54, 0, 0, 0, 7])));
        assert_eq!((c.console, serial), (ConsoleSpec::None, SerialTarget::Stdout));
        let (c, _) = convert(r#"{"payload":{"kernel":"/k"},"vsock":{"cid":3,"socket":"/tmp/v.sock"}}"#).unwrap();
        assert_eq!(c.vsock, Some(config::VsockSpec { cid: 3, socket: "/tmp/v.sock".into() }));
    }

    #[test]
    fn defaults_follow_cloud_hypervisor() {
        let (c, serial) = convert(r#"{"payload":{"kernel":"/k"}}"#).unwrap();
        assert_eq!((c.cpus, c.memory, c.rng), (1, config::DEFAULT_MEMORY, true));
        assert!(c.pci_hotplug, "the API's vm.add-* need the hotplug slots");
        assert_eq!((c.console, serial), (ConsoleSpec::File("/dev/null".into()), SerialTarget::Discard));
    }

    #[test]
    fn what_kickvm_lacks_is_refused_in_one_line() {
        for (json, words) in [
            (r#"{"payload":{"kernel":"/k"},"fs":[{"tag":"x"}]}"#, "virtio-fs"),
            (r#"{"payload":{"firmware":"/fw"}}"#, "payload.kernel"),
            (r#"{"payload":{}}"#, "payload.kernel is missing"),
            (r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":300,"max_vcpus":300}}"#, "boot_vcpus 300"),
            (r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":2,"max_vcpus":1}}"#, "below"),
            (r#"{"payload":{"kernel":"/k"},"memory":{"size":1,"hotplug_size":1024}}"#, "hotplug"),
            (r#"{"payload":{"kernel":"/k"},"net":[{"tap":"t","num_queues":3}]}"#, "even number"),
            (r#"{"payload":{"kernel":"/k"},"net":[{"mac":"52:54:00:00:00:07"}]}"#, "give `tap`"),
            (r#"{"payload":{"kernel":"/k"},"disks":[{"readonly":true}]}"#, "without `path`"),
            (r#"{"payload":{"kernel":"/k"},"serial":{"mode":"Pty"}}"#, "serial"),
            (r#"{"payload":{"kernel":"/k"},"console":{"mode":"Banana"}}"#, "VmConfig"),
            (r#"{"payload":{"kernel":"/k"},"rng":{"src":"/dev/zero"}}"#, "/dev/urandom"),
            (r#"{"payload":{"kernel":"/k"},"vsock":{"cid":2,"socket":"/v"}}"#, "vsock.cid 2"),
            (r#"{"payload":{"kernel":"/k"},"vsock":{"cid":3}}"#, "vsock.socket"),
            (r#"{"payload":"#, "not valid JSON"),
            ("[1,2]", "VmConfig"),
        ] {
            let e = convert(json).unwrap_err().0;
            assert!(e.contains(words) && !e.contains('\n'), "{json}: {e}");
        }
    }
}
