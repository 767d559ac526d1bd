//! QEMU — a vhost-user frontend none of us wrote — on our blk back-end:
//! the project's default guest image boots under TCG with
//! `vhost-user-blk-pci` (two queues) on guest RAM in a shared memfd, reads
//! what the host wrote on the disk and writes to it; then the back-end
//! drops the connection, QEMU reconnects (`reconnect=1`), and the guest's
//! I/O goes on; a file system made on the disk survives write, `sync`,
//! reboot (QEMU stops and restarts the rings on the same connection) and
//! read-back. Two boots in one QEMU, ~20 s under TCG.
//!
//! Skipped (with the reason printed) without `qemu-system-x86_64` or the
//! guest image (`target/debug/kickvm-rig image` builds it).

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use common::*;
use kickvm_virtio::block::{Block, BlockConfig};

const HOST_WROTE: &[u8; 24] = b"KICKVM-VHOST-HOST-WROTE!";
const GUEST_WROTE: &[u8; 24] = b"KICKVM-VHOST-GUEST-WROTE";
const AFTER_RECONNECT: &[u8; 24] = b"KICKVM-VHOST-AFTER-RECON";
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// Where the raw reads and writes go: past the file system the guest makes
/// on the first 8 MiB.
const RAW: u64 = 20480;

/// The guest's side. First boot: read the sector the host wrote, write
/// the next; after the back-end came back, read that from the device (not
/// the page cache) and write a third; then make a file system, write a
/// file, `sync`, reboot. Second boot (same command line, same vhost-user
/// connection): the file is there. `fsync`/`sync` make each write reach
/// the back-end.
fn script() -> String {
    let host = std::str::from_utf8(HOST_WROTE).unwrap();
    let guest = std::str::from_utf8(GUEST_WROTE).unwrap();
    let after = std::str::from_utf8(AFTER_RECONNECT).unwrap();
    let (s0, s1, s2) = (RAW, RAW + 8, RAW + 16);
    format!(
        "set -e
[ -b /dev/vda ] || {{ echo NO-DISK; ls /dev; exit 2; }}
mkdir -p /mnt
if mount -t ext4 /dev/vda /mnt 2>/dev/null; then
    got=$(cat /mnt/kickvm.txt)
    echo \"READ4:$got\"
    umount /mnt
    [ \"$got\" = {FS_TEXT} ] || exit 5
    echo PHASE4-DONE
    exit 0
fi
echo 3 > /proc/sys/vm/drop_caches
got=$(dd if=/dev/vda bs=512 skip={s0} count=1 2>/dev/null | head -c 24)
echo \"READ1:$got\"
[ \"$got\" = {host} ] || exit 3
printf {guest} | dd of=/dev/vda bs=512 seek={s1} conv=notrunc,fsync 2>/dev/null
echo PHASE1-DONE
sleep 5
echo 3 > /proc/sys/vm/drop_caches
got=$(dd if=/dev/vda bs=512 skip={s1} count=1 2>/dev/null | head -c 24)
echo \"READ2:$got\"
[ \"$got\" = {guest} ] || exit 4
printf {after} | dd of=/dev/vda bs=512 seek={s2} conv=notrunc,fsync 2>/dev/null
echo PHASE2-DONE
mke2fs -q /dev/vda 8192
mount -t ext4 /dev/vda /mnt
echo {FS_TEXT} > /mnt/kickvm.txt
sync
umount /mnt
echo PHASE3-DONE
reboot -f
"
    )
}

const FS_TEXT: &str = "FS-SURVIVED-REBOOT";

#[test]
fn qemu_boots_reads_writes_reconnects_and_reboots_on_our_blk_backend() {
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

    let dir = Scratch::new("qemu");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 16 << 20]).unwrap();
    std::fs::File::options().write(true).open(&disk).unwrap().write_all_at(HOST_WROTE, RAW * 512).unwrap();
    let mut cfg = BlockConfig::new(&disk);
    cfg.num_queues = 2;
    let dev: Box<dyn kickvm_virtio::VirtioDevice> = Box::new(Block::new("blk0", cfg).unwrap());

    let socket = dir.path("blk.sock");
    let (backend, conns) = backend_with_cut(&socket, dev, 2);

    let cmdline = format!("console=ttyS0 panic=-1 quiet {}", kickvm_rig::image::script_cmdline(&script()));
    let mut cmd = Command::new(&qemu);
    cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "256M", "-smp", "1", "-nodefaults", "-no-user-config"])
        // No -no-reboot: the guest's `reboot` boots it again.
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", &cmdline])
        .args(["-object", "memory-backend-memfd,id=m,size=256M,share=on", "-numa", "node,memdev=m"])
        .args(["-chardev", &format!("socket,id=c,path={},reconnect=1", socket.display())])
        .args(["-device", "vhost-user-blk-pci,chardev=c,num-queues=2"]);
    let mut cut = false;
    let run = run_qemu(cmd, BOOT_TIMEOUT, |l| {
        if l.contains("PHASE1-DONE") && !cut {
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
        "the guest's script failed or never finished.\nQEMU stderr:\n{}",
        run.stderr
    );
    assert!(cut, "the connection was cut after phase 1");
    assert!(run.console.contains("PHASE2-DONE") && run.console.contains("PHASE3-DONE"));
    assert!(run.console.contains(&format!("READ4:{FS_TEXT}")), "the file survived the reboot");

    // What the guest wrote is in the file, before and after the reconnect.
    let f = std::fs::File::open(&disk).unwrap();
    let mut buf = [0u8; 24];
    f.read_exact_at(&mut buf, (RAW + 8) * 512).unwrap();
    assert_eq!(&buf, GUEST_WROTE);
    f.read_exact_at(&mut buf, (RAW + 16) * 512).unwrap();
    assert_eq!(&buf, AFTER_RECONNECT);
    assert!(backend.join().unwrap().is_some(), "the back-end served both connections");
}
