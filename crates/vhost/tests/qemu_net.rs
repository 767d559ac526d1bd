//! QEMU's `virtio-net-pci` on a `-netdev vhost-user` served by our net
//! back-end, whose TAP lives in a network namespace of the test's own: the
//! default guest image boots under TCG and pings the TAP's address. One
//! boot, ~10–20 s. QEMU enables the rings before it sets the features
//! (see `Connection::enable_came_early`): this test is what shows that is
//! handled.
//!
//! Skipped (with the reason printed) without root, /dev/net/tun,
//! `qemu-system-x86_64` or the guest image.

mod common;

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kickvm_virtio::net::{NetConfig, NetDevice};

const TAP: &str = "kvvqtap0";
const GUEST_MAC: &str = "52:54:00:12:34:57";

#[test]
fn qemu_guest_pings_over_our_net_backend() {
    init_log();
    let qemu = kickvm_rig::qemu::qemu_binary();
    if Command::new(&qemu).arg("--version").output().is_err() {
        eprintln!("skipped: {qemu} not found (scripts/install-deps.sh installs it)");
        return;
    }
    let image = match kickvm_rig::image::image(kickvm_rig::image::Variant::Guest) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("skipped: no guest image ({e})");
            return;
        }
    };
    let Some(ns) = NetNs::new("qemu") else { return };
    let cfg = NetConfig { name: "net0".into(), tap: TAP.into(), queue_pairs: 1, ..NetConfig::default() };
    let dev: Box<dyn kickvm_virtio::VirtioDevice> = Box::new(NetDevice::new(cfg).expect("TAP"));
    ns.ip(&format!("addr add 10.0.2.1/24 dev {TAP}"));
    ns.ip(&format!("link set {TAP} up"));

    let dir = Scratch::new("qemu-net");
    let socket = dir.path("net.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    // Spawned from this thread: the back-end's threads are in the namespace.
    let backend = std::thread::spawn(move || {
        let (s, _) = listener.accept().ok()?;
        kickvm_vhost::serve(s, dev)
    });

    let script = "ping -c 3 -W 5 10.0.2.1";
    let cmdline = format!(
        "console=ttyS0 panic=-1 quiet kickvm.ip=10.0.2.15/24 {}",
        kickvm_rig::image::script_cmdline(script)
    );
    let start = Instant::now();
    let child = Command::new(&qemu)
        .args(["-accel", "tcg", "-cpu", "max", "-m", "256M", "-smp", "1", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", &cmdline])
        .args(["-object", "memory-backend-memfd,id=m,size=256M,share=on", "-numa", "node,memdev=m"])
        .args(["-chardev", &format!("socket,id=c,path={}", socket.display())])
        .args(["-netdev", "vhost-user,id=n,chardev=c"])
        // vectors=0: QEMU 7.2 under TCG segfaults in vhost_net_start
        // (msix_set_vector_notifiers) with MSI-X on, before it sends the
        // back-end anything about rings; INTx avoids that path.
        .args(["-device", &format!("virtio-net-pci,netdev=n,mac={GUEST_MAC},vectors=0")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let end = start + Duration::from_secs(240);
    while child.try_wait().unwrap().is_none() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    let console = reader.join().unwrap();
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    let tail: String = console.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    eprintln!("guest ran {:.1} s; QEMU {status}; console tail:\n{tail}", start.elapsed().as_secs_f64());
    assert_eq!(
        kickvm_rig::image::parse_exit_status(&console),
        Some(0),
        "the guest's ping failed.\nQEMU stderr:\n{err}"
    );
    assert!(console.contains("3 packets received"), "three replies");
    assert!(backend.join().unwrap().is_some());
    drop(ns);
}
