//! QEMU's `virtio-net-pci` on a `-netdev vhost-user` served by our net
//! back-end, whose TAP lives in a network namespace of the test's own: the
//! default guest image boots under TCG and pings the TAP's address; the
//! back-end drops the connection, QEMU reconnects (`reconnect=1`) and the
//! pings go on. One boot, ~15 s.
//!
//! QEMU enables the rings before it sets the features, and not again
//! after a reconnect (see `Connection::enable_came_early`): this test is
//! what shows both are handled.
//!
//! Skipped (with the reason printed) without root, /dev/net/tun,
//! `qemu-system-x86_64` or the guest image.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use kickvm_virtio::net::{NetConfig, NetDevice};

const TAP: &str = "kvvqtap0";
const GUEST_MAC: &str = "52:54:00:12:34:57";

#[test]
fn qemu_guest_pings_over_our_net_backend_across_a_reconnect() {
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
    // Started from this thread: the back-end's threads are in the namespace.
    let (backend, conns) = backend_with_cut(&socket, dev, 2);

    let script = "set -e
ping -c 3 -W 5 10.0.2.1
echo PING1-DONE
sleep 6
ping -c 3 -W 5 10.0.2.1
echo PING2-DONE";
    let cmdline = format!(
        "console=ttyS0 panic=-1 quiet kickvm.ip=10.0.2.15/24 {}",
        kickvm_rig::image::script_cmdline(script)
    );
    let mut cmd = Command::new(&qemu);
    cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "256M", "-smp", "1", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", &cmdline])
        .args(["-object", "memory-backend-memfd,id=m,size=256M,share=on", "-numa", "node,memdev=m"])
        .args(["-chardev", &format!("socket,id=c,path={},reconnect=1", socket.display())])
        .args(["-netdev", "vhost-user,id=n,chardev=c"])
        // vectors=0: QEMU 7.2 under TCG segfaults in vhost_net_start
        // (msix_set_vector_notifiers) with MSI-X on, before it sends the
        // back-end anything about rings; INTx avoids that path.
        .args(["-device", &format!("virtio-net-pci,netdev=n,mac={GUEST_MAC},vectors=0")]);
    let mut cut = false;
    let run = run_qemu(cmd, Duration::from_secs(240), |l| {
        if l.contains("PING1-DONE") && !cut {
            // The back-end "dies": its end of the connection goes away.
            let s = conns.try_recv().expect("QEMU connected to the back-end");
            s.shutdown(std::net::Shutdown::Both).unwrap();
            cut = true;
        }
    });
    eprintln!("guest ran {:.1} s; QEMU {}; console tail:\n{}", run.secs, run.status, run.tail());
    assert_eq!(
        kickvm_rig::image::parse_exit_status(&run.console),
        Some(0),
        "the guest's pings failed.\nQEMU stderr:\n{}",
        run.stderr
    );
    assert!(cut, "the connection was cut after the first pings");
    assert_eq!(run.console.matches("3 packets received").count(), 2, "three replies before and after");
    assert!(backend.join().unwrap().is_some());
    drop(ns);
}
