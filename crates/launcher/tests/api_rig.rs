//! The Kata-like lifecycle, end to end with a real Linux guest (in the
//! nested rig on hosts whose KVM cannot run one): start `kickvm
//! --api-socket`, poll `vmm.ping`, `vm.create` with the default guest
//! image, `vm.info` = Created, `vm.add-net` with a TAP fd this test opened
//! (as Kata's runtime does), `vm.boot`, `vm.info` = Running, the guest
//! pings the host over that NIC, a host program reaches the guest's
//! listener through hybrid vsock (`CONNECT 1024`, as Kata reaches its
//! agent) and 1 MiB goes each way (an echo, checksummed), `vm.counters`
//! shows the traffic; then, on the running VM, `vm.add-disk` (the guest
//! finds a new virtio disk, reads what the host wrote and writes back,
//! checked in the host file), `vm.add-net` with a second TAP's fd (the
//! guest brings the NIC up and pings the host through it),
//! `vm.remove-device` of that card (the guest ejects it, its TAP closes) and
//! `vm.power-button` (the guest, waiting for KEY_POWER on the button's
//! input device, powers off: `vm.info` = Shutdown); `vmm.shutdown` → the
//! process is gone within 3 s, exit status 0, with no TAP, socket or
//! thread left behind. curl is the client.

mod api_common;
mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use api_common::*;

macro_rules! in_rig {
    ($name:literal) => {
        if let Some(passed) = kickvm_rig::reexec_test_in_rig_if_needed($name) {
            assert!(passed, "{} failed inside the rig", $name);
            return;
        }
    };
}

/// Opens TAP `name` (one queue, virtio-net header) and gives the host side
/// `addr`: the fd stays ours, as an orchestrator's would.
fn open_tap(name: &str, addr: &str) -> std::fs::File {
    let f = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").expect("/dev/net/tun");
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes one 40-byte struct ifreq.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, req.as_mut_ptr()) };
    assert_eq!(r, 0, "TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    let ip = |args: &[&str]| assert!(Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
    ip(&["addr", "add", addr, "dev", name]);
    ip(&["link", "set", name, "up"]);
    f
}

/// The next console line holding `marker`, within `secs`: panics with
/// what the guest printed meanwhile if it does not come.
fn wait_line(rx: &mpsc::Receiver<String>, marker: &str, secs: u64) -> Duration {
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(secs);
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains(marker) => return t0.elapsed(),
            Ok(line) if line.contains(kickvm_rig::image::EXIT_STATUS_PREFIX) => {
                panic!("the guest script ended before {marker}: {line}\n{}", seen.join("\n"))
            }
            Ok(line) => seen.push(line),
            Err(_) => panic!("no {marker} from the guest within {secs} s; console meanwhile:\n{}", seen.join("\n")),
        }
    }
}

/// The guest's script: the vsock echo listener; the power button's input
/// device opened first (so no press is missed); ping over the first NIC;
/// then each device plugged in while it runs, as the host adds them; at
/// last, wait for KEY_POWER (an `input_event` of type 1, code 116, value
/// 1: its fifth and sixth dwords) and power off.
const GUEST_SCRIPT: &str = r#"socat -t 60 VSOCK-LISTEN:1024 EXEC:cat &
for e in /sys/class/input/event*; do grep -q "Power Button" $e/device/name && exec 3</dev/input/${e##*/}; done
[ -e /proc/self/fd/3 ] || { echo NO-POWER-BUTTON; exit 1; }
ping -c 3 -W 2 10.0.2.2 && echo PING-OK
i=0; while [ ! -e /dev/vda ] && [ $i -lt 300 ]; do sleep 1; i=$((i+1)); done
[ "$(head -c 16 /dev/vda)" = KICKVM-HOST-DATA ] && echo KICKVM-GUEST-WROTE | dd of=/dev/vda bs=4096 seek=1 conv=fsync 2>/dev/null && echo HOTPLUG-DISK-OK
i=0; while [ ! -e /sys/class/net/eth1 ] && [ $i -lt 300 ]; do sleep 1; i=$((i+1)); done
ip addr add 10.0.3.15/24 dev eth1 && ip link set eth1 up && ping -c 3 -W 2 10.0.3.2 && echo HOTPLUG-PING-OK
while :; do set -- $(dd bs=24 count=1 <&3 2>/dev/null | hexdump -v -e '6/4 "%08x " "
"'); [ "$5" = 00740001 ] && [ "$6" = 00000001 ] && break; done
echo KEY-POWER
poweroff -f"#;

/// FNV-1a, 64 bits: a checksum of what went and what came back.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Through Cloud Hypervisor's hybrid vsock: `CONNECT port`, then `len`
/// bytes to the guest's echo listener while reading them back: whether
/// what came back has the checksum of what went, or what went wrong.
fn vsock_echo(sock: &std::path::Path, port: u32, len: usize) -> Result<bool, String> {
    use std::io::{Read, Write};
    let mut s = UnixStream::connect(sock).map_err(|e| format!("connect to {}: {e}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(|e| format!("CONNECT: {e}"))?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        s.read_exact(&mut b).map_err(|e| format!("no OK line after CONNECT {port}: {e} (got {line:?})"))?;
        line.push(b[0]);
    }
    if !line.starts_with(b"OK ") {
        return Err(format!("CONNECT answered {:?}", String::from_utf8_lossy(&line)));
    }
    let data = data_copy(len);
    let sent = fnv(&data);
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&data).and_then(|_| w.shutdown(std::net::Shutdown::Write))
    });
    let mut back = Vec::with_capacity(len);
    s.read_to_end(&mut back).map_err(|e| format!("reading the echo after {} bytes: {e}", back.len()))?;
    writer.join().unwrap().map_err(|e| format!("writing: {e}"))?;
    if back.len() != len {
        // socat's default 0.5 s after the first EOF cut an echo short
        // once (`-t 60` above since); a device losing bytes looks the same.
        return Err(format!("{} of {len} bytes came back", back.len()));
    }
    match back.iter().zip(&data_copy(len)).position(|(a, b)| a != b) {
        Some(at) => Err(format!("the {len} bytes came back different from byte {at} on")),
        None => Ok(fnv(&back) == sent),
    }
}

/// The bytes [`vsock_echo`] sends.
fn data_copy(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1]).collect()
}

#[test]
fn kata_like_lifecycle_over_the_api() {
    in_rig!("kata_like_lifecycle_over_the_api");
    if let Some(why) = missing(true) {
        eprintln!("skipped: {why}");
        return;
    }
    let img = kickvm_rig::default_image().expect("default guest image");
    let dir = common::scratch("api-rig");
    let t0 = Instant::now();
    let mut api = Api::start(&dir);
    eprintln!("api-rig: vmm.ping answered {:.0} ms after spawn", t0.elapsed().as_secs_f64() * 1e3);

    let vsock = dir.join("vsock.sock");
    let cmdline = format!("loglevel=4 {}", kickvm_rig::image::script_cmdline(GUEST_SCRIPT));
    let body = serde_json::json!({
        "payload": { "kernel": img.kernel, "initramfs": img.initrd, "cmdline": cmdline },
        "cpus": { "boot_vcpus": 1, "max_vcpus": 1 },
        "memory": { "size": 256u64 << 20 },
        "serial": { "mode": "Tty" },
        "console": { "mode": "Off" },
        "vsock": { "cid": 3, "socket": vsock },
    });
    assert_eq!(api.curl("PUT", "vm.create", Some(&body.to_string())).0, 204);
    assert_eq!(api.state(), "Created");

    let tap = open_tap("kvapi0", "10.0.2.2/24");
    let s = UnixStream::connect(&api.sock).unwrap();
    let (code, resp) = raw_request(&s, "PUT", "vm.add-net", r#"{"mac":"52:54:00:12:34:56"}"#, &[tap.as_raw_fd()]);
    assert_eq!(code, 200, "{resp}");
    drop(s);
    drop(tap); // kickvm holds its own; the TAP lives as long as it does

    // The console, line by line, on a thread.
    let stdout = api.child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });

    let t_boot = Instant::now();
    let (code, resp) = api.curl("PUT", "vm.boot", None);
    assert_eq!(code, 204, "vm.boot: {resp}");
    assert_eq!(api.state(), "Running");
    let mut seen_init = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(kickvm_rig::image::INIT_START_MARKER) => seen_init = Some(t_boot.elapsed()),
            Ok(line) if line.contains("PING-OK") => break,
            Ok(line) if line.contains(kickvm_rig::image::EXIT_STATUS_PREFIX) => panic!("the guest script ended: {line}"),
            Ok(_) => {}
            Err(_) => panic!("no PING-OK from the guest within 120 s"),
        }
    }
    if let Some(t) = seen_init {
        eprintln!("api-rig: vm.boot to /init marker {:.2} s", t.as_secs_f64());
    }

    let t_vsock = Instant::now();
    match vsock_echo(&vsock, 1024, 1 << 20) {
        Ok(true) => {}
        Ok(false) => panic!("the 1 MiB came back different"),
        Err(e) => {
            let console: Vec<String> = rx.try_iter().collect();
            panic!("hybrid vsock: {e}\nconsole since PING-OK:\n{}", console.join("\n"));
        }
    }
    eprintln!("api-rig: 1 MiB each way over hybrid vsock in {:.2} s", t_vsock.elapsed().as_secs_f64());

    let (code, counters) = api.curl("GET", "vm.counters", None);
    assert_eq!(code, 200, "{counters}");
    let v: serde_json::Value = serde_json::from_str(&counters).unwrap();
    let n = |k: &str| v["net0"][k].as_u64().unwrap_or(0);
    eprintln!("api-rig: net0 counters: {}", v["net0"]);
    assert!(n("q0_bytes") >= 3 * 84 && n("q1_bytes") >= 3 * 84, "3 pings each way: {counters}");
    assert!(n("q0_chains") >= 3 && n("q1_chains") >= 3 && n("q0_interrupts") > 0, "{counters}");
    assert_eq!(n("needs_reset"), 0);
    let vs = |k: &str| v["vsock0"][k].as_u64().unwrap_or(0);
    eprintln!("api-rig: vsock0 counters: {}", v["vsock0"]);
    assert!(vs("q0_bytes") >= 1 << 20 && vs("q1_bytes") >= 1 << 20, "1 MiB each way on vsock0: {counters}");

    hotplug_and_power_button(&api, &dir, &rx);

    let pid = api.child.id();
    let t_exit = Instant::now();
    let sock = api.sock.clone();
    let s = UnixStream::connect(&sock).unwrap();
    let (code, _) = raw_request(&s, "PUT", "vmm.shutdown", "", &[]);
    assert_eq!(code, 204);
    eprintln!("api-rig: vmm.shutdown answered in {:.0} ms", t_exit.elapsed().as_secs_f64() * 1e3);
    let status = loop {
        if let Some(s) = api.child.try_wait().unwrap() {
            break s;
        }
        assert!(t_exit.elapsed() < Duration::from_secs(3), "kickvm still runs 3 s after vmm.shutdown");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "kickvm exited {status}");
    eprintln!("api-rig: vmm.shutdown to exit {:.0} ms", t_exit.elapsed().as_secs_f64() * 1e3);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "no thread of kickvm is left");
    assert!(!sock.exists(), "the API socket is left behind");
    assert!(!vsock.exists(), "the vsock socket is left behind");
    assert!(!std::path::Path::new("/sys/class/net/kvapi0").exists(), "the TAP is left behind");
    assert!(!std::path::Path::new("/sys/class/net/kvapi1").exists(), "the hot-plugged card's TAP is left behind");
    let mut log = String::new();
    std::io::Read::read_to_string(&mut api.child.stderr.take().unwrap(), &mut log).unwrap();
    for l in log.lines().filter(|l| l.contains("stopped")) {
        eprintln!("api-rig: kickvm: {l}");
    }
    let console = reader.join().unwrap();
    assert!(console.contains("PING-OK"), "{console}");
    let _ = std::fs::remove_dir_all(dir);
}

/// On the running VM (net0, rng0, vsock0 in slots 1..3): a disk, then a
/// card, plugged in and used by the guest; then the power button.
fn hotplug_and_power_button(api: &Api, dir: &std::path::Path, rx: &mpsc::Receiver<String>) {
    use std::io::{Read, Seek};
    let mut image = vec![0u8; 1 << 20];
    image[..16].copy_from_slice(b"KICKVM-HOST-DATA");
    let disk = common::write(dir, "hotplug.img", &image);
    let t0 = Instant::now();
    let (code, resp) = api.curl("PUT", "vm.add-disk", Some(&format!(r#"{{"path":"{}"}}"#, disk.display())));
    assert_eq!(code, 200, "vm.add-disk after boot: {resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!((v["id"].as_str(), v["bdf"].as_str()), (Some("blk0"), Some("0000:00:04.0")), "{resp}");
    wait_line(rx, "HOTPLUG-DISK-OK", 120);
    eprintln!("api-rig: vm.add-disk to the guest's write on it {:.2} s", t0.elapsed().as_secs_f64());
    let mut f = std::fs::File::open(&disk).unwrap();
    f.seek(std::io::SeekFrom::Start(4096)).unwrap();
    let mut wrote = [0u8; 18];
    f.read_exact(&mut wrote).unwrap();
    assert_eq!(&wrote, b"KICKVM-GUEST-WROTE", "the guest's write is in the host file");

    let tap = open_tap("kvapi1", "10.0.3.2/24");
    let t0 = Instant::now();
    let s = UnixStream::connect(&api.sock).unwrap();
    let (code, resp) = raw_request(&s, "PUT", "vm.add-net", r#"{"mac":"52:54:00:12:34:57"}"#, &[tap.as_raw_fd()]);
    assert_eq!(code, 200, "vm.add-net after boot: {resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!((v["id"].as_str(), v["bdf"].as_str()), (Some("net1"), Some("0000:00:05.0")), "{resp}");
    drop(s);
    drop(tap);
    wait_line(rx, "HOTPLUG-PING-OK", 120);
    eprintln!("api-rig: vm.add-net to 3 pings through the new card {:.2} s", t0.elapsed().as_secs_f64());

    let (code, counters) = api.curl("GET", "vm.counters", None);
    assert_eq!(code, 200, "{counters}");
    let v: serde_json::Value = serde_json::from_str(&counters).unwrap();
    let n = |d: &str, k: &str| v[d][k].as_u64().unwrap_or(0);
    assert!(n("net1", "q0_bytes") >= 3 * 84 && n("net1", "q1_bytes") >= 3 * 84, "3 pings each way on net1: {counters}");
    assert!(n("blk0", "q0_chains") > 0 && n("blk0", "needs_reset") == 0, "{counters}");
    let (_, info) = api.curl("GET", "vm.info", None);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["device_tree"]["net1"]["pci_bdf"], "0000:00:05.0", "{info}");

    // The card goes again: the guest ejects it, kickvm closes its TAP fds
    // (the TAP, which only the fds kept alive, is gone from the host).
    let t0 = Instant::now();
    let (code, resp) = api.curl("PUT", "vm.remove-device", Some(r#"{"id":"net1"}"#));
    assert_eq!(code, 204, "vm.remove-device: {resp}");
    eprintln!("api-rig: vm.remove-device net1 answered after the guest's eject in {:.2} s", t0.elapsed().as_secs_f64());
    let (_, info) = api.curl("GET", "vm.info", None);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert!(v["device_tree"].get("net1").is_none() && v["config"]["net"].as_array().map(Vec::len) == Some(1), "{info}");
    while std::path::Path::new("/sys/class/net/kvapi1").exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "the removed card's TAP is still open 10 s after vm.remove-device");
        std::thread::sleep(Duration::from_millis(20));
    }

    let t0 = Instant::now();
    let (code, resp) = api.curl("PUT", "vm.power-button", None);
    assert_eq!(code, 204, "vm.power-button: {resp}");
    wait_line(rx, "KEY-POWER", 60);
    while api.state() != "Shutdown" {
        assert!(t0.elapsed() < Duration::from_secs(60), "the guest did not power off within 60 s of vm.power-button");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("api-rig: vm.power-button to the VM's power-off {:.2} s", t0.elapsed().as_secs_f64());
}
