//! End to end, in the rig: `kickvm run --vhost-user` boots the default
//! guest image with its devices served by vhost-user back-ends — kickvm's
//! own (`kickvm backend blk|net|console|rng`) and one none of us wrote
//! (`qemu-storage-daemon`'s vhost-user-blk export) — and survives a
//! back-end that is killed and started again.
//!
//! One boot does every check (each rig boot costs ~10 s of L1 and a guest
//! boot under TCG).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kickvm_rig::image::script_cmdline;

macro_rules! in_rig {
    ($name:literal) => {
        if let Some(passed) = kickvm_rig::reexec_test_in_rig_if_needed($name) {
            assert!(passed, "{} failed inside the rig", $name);
            return;
        }
    };
}

/// A back-end process, killed when dropped.
struct Backend {
    child: Child,
    args: Vec<String>,
    socket: PathBuf,
}

impl Backend {
    /// Starts `program args` and waits for it to listen on `socket`.
    fn start(program: &str, args: Vec<String>, socket: &Path) -> Backend {
        let args: Vec<String> = std::iter::once(program.to_string()).chain(args).collect();
        Backend { child: Backend::spawn(&args, socket), args, socket: socket.into() }
    }

    fn spawn(args: &[String], socket: &Path) -> Child {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(&args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", args[0]));
        let end = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(Instant::now() < end, "{} does not listen on {}", args.join(" "), socket.display());
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    /// `kickvm backend KIND --socket SOCKET OPTS`
    fn kickvm(kind: &str, socket: &Path, opts: &str) -> Backend {
        let args = ["backend", kind, "--socket", &socket.to_string_lossy(), opts].map(String::from).to_vec();
        Backend::start(env!("CARGO_BIN_EXE_kickvm"), args, socket)
    }

    /// Kills it: SIGKILL, no goodbye on the socket.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again after [`Backend::kill`].
    fn restart(&mut self) {
        self.child = Backend::spawn(&self.args, &self.socket);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates TAP `name` (multi-queue if `multi`) with `addr` on the host side.
fn tap(name: &str, addr: &str, multi: bool) -> bool {
    let ok = |args: &[&str]| Command::new("ip").args(args).status().map(|s| s.success()).unwrap_or(false);
    let mq: &[&str] = if multi { &["multi_queue"] } else { &[] };
    ok(&[&["tuntap", "add", "dev", name, "mode", "tap"], mq].concat())
        && ok(&["addr", "add", addr, "dev", name])
        && ok(&["link", "set", name, "up"])
}

/// Boots the default image with `args` and `script`; `on_line` sees each
/// console line as it comes. Returns kickvm's status, console and stderr.
fn boot(args: &[String], script: &str, timeout: Duration, mut on_line: impl FnMut(&str)) -> (Option<i32>, String, String) {
    let img = kickvm_rig::default_image().expect("default guest image");
    let cmdline = format!("loglevel=4 {}", script_cmdline(script));
    let mut child = Command::new(env!("CARGO_BIN_EXE_kickvm"))
        .args(["run", "--kernel"])
        .arg(&img.kernel)
        .arg("--initrd")
        .arg(&img.initrd)
        .args(["--cmdline", &cmdline])
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start kickvm");
    let killer = common::kill_after(child.id(), timeout);
    let err_thread = common::read_all(child.stderr.take().unwrap());
    let mut console = String::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        println!("guest: {line}");
        on_line(&line);
        console.push_str(&line);
        console.push('\n');
    }
    let status = child.wait().ok().and_then(|s| s.code());
    let _ = killer.join();
    let stderr = err_thread.join().unwrap_or_default();
    eprintln!("kickvm stderr:\n{stderr}");
    (status, console, stderr)
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kickvm-vu-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

/// The guest's script: every device works (vda: `kickvm backend blk`; vdb:
/// qemu-storage-daemon, 2 queues; eth0: 2 queue pairs), then (at
/// `kill-blk-and-net`) the blk and net back-ends die: their devices show
/// DEVICE_NEEDS_RESET (0x40) in their status while rng and console go on;
/// the back-ends come back and blk and net I/O resumes, the status clean.
const SCRIPT: &str = r#"
set -e
w() { echo $1 | dd of=$2 bs=512 seek=$3 conv=sync,fsync 2>/dev/null; }
r() { dd if=$2 bs=512 skip=$3 count=1 iflag=direct 2>/dev/null | grep -q $1; }
rng() { test "$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | wc -c)" = 32; }
broken() { n=0; for d in /sys/bus/virtio/devices/*; do [ $(( $(cat $d/status) & 0x40 )) = 0 ] || n=$((n+1)); done; echo $n; }
w by-kickvm-backend /dev/vda 0
w by-qsd /dev/vdb 0
echo 3 > /proc/sys/vm/drop_caches
r by-kickvm-backend /dev/vda 0
r by-qsd /dev/vdb 0
test "$(ls /sys/block/vdb/mq | wc -l)" = 2
echo blk-ok
ping -c 3 -W 3 10.0.2.2 >/dev/null
test "$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)" = 2
echo net-ok
echo console-says-hello > /dev/hvc0
rng
echo rng-ok
test "$(broken)" = 0
echo kill-blk-and-net
sleep 1
test "$(broken)" = 2
echo needs-reset-while-away
rng
echo console-while-away > /dev/hvc0
echo others-ok-while-away
w after-restart /dev/vda 8
r after-restart /dev/vda 8
echo blk-after-restart-ok
ping -c 5 -w 20 10.0.2.2 >/dev/null
echo net-after-restart-ok
test "$(broken)" = 0
"#;

#[test]
fn vhost_user_backends_serve_a_guest_and_can_restart() {
    in_rig!("vhost_user_backends_serve_a_guest_and_can_restart");
    if Command::new("qemu-storage-daemon").arg("--version").output().is_err() {
        eprintln!("skipped: qemu-storage-daemon is not installed (Debian package qemu-system-x86)");
        return;
    }
    assert!(tap("vutap0", "10.0.2.2/24", true), "cannot create TAP vutap0 (needs root and iproute2)");
    let dir = scratch("all");
    let (ours, qsd_img) = (image(&dir, "ours.img", 16 << 20), image(&dir, "qsd.img", 16 << 20));
    let hvc = dir.join("hvc0.log");
    let sock = |n: &str| dir.join(n);
    let mut blk = Backend::kickvm("blk", &sock("blk.sock"), &format!("path={}", ours.display()));
    let qsd = Backend::start(
        "qemu-storage-daemon",
        vec![
            "--blockdev".into(),
            format!("driver=file,node-name=f,filename={}", qsd_img.display()),
            "--export".into(),
            format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues=2",
                sock("qsd.sock").display()
            ),
        ],
        &sock("qsd.sock"),
    );
    let mut net = Backend::kickvm("net", &sock("net.sock"), "tap=vutap0,queues=2");
    let console = Backend::kickvm("console", &sock("console.sock"), &format!("file={}", hvc.display()));
    let rng = Backend::kickvm("rng", &sock("rng.sock"), "");
    let arg = |kind: &str, s: &str, extra: &str| format!("{kind},socket={}{extra}", sock(s).display());
    let args: Vec<String> = vec![
        "--vhost-user".into(),
        arg("blk", "blk.sock", ""),
        "--vhost-user".into(),
        arg("blk", "qsd.sock", ",queues=2"),
        "--vhost-user".into(),
        arg("net", "net.sock", ",queues=2"),
        "--vhost-user".into(),
        arg("console", "console.sock", ""),
        "--vhost-user".into(),
        arg("rng", "rng.sock", ""),
        "--cpus".into(),
        "2".into(),
    ];
    let (status, out, stderr) = boot(&args, SCRIPT, Duration::from_secs(300), |line| {
        if line.contains("kill-blk-and-net") {
            blk.kill();
            net.kill();
            std::thread::sleep(Duration::from_secs(3));
            blk.restart();
            net.restart();
        }
    });
    drop((qsd, console, rng));
    let _ = Command::new("ip").args(["link", "del", "vutap0"]).status();
    let exit = kickvm_rig::image::parse_exit_status(&out);
    assert_eq!(exit, Some(0), "guest script failed:\n{out}\nstderr: {stderr}");
    assert_eq!(status, Some(0), "kickvm status; stderr: {stderr}");
    for step in ["blk-ok", "net-ok", "rng-ok", "needs-reset-while-away", "others-ok-while-away", "blk-after-restart-ok", "net-after-restart-ok"] {
        assert!(out.contains(step), "no {step}:\n{out}");
    }
    let text = std::fs::read_to_string(&hvc).unwrap_or_default();
    assert!(text.contains("console-says-hello") && text.contains("console-while-away"), "console file: {text:?}");
    assert!(stderr.contains("hung up"), "no log line for the back-end going away: {stderr}");
    assert!(stderr.contains("is back"), "no log line for the back-end coming back: {stderr}");
    let data = std::fs::read(&qsd_img).unwrap();
    assert!(data.starts_with(b"by-qsd\n"), "qsd's image does not hold the guest's write");
    let data = std::fs::read(&ours).unwrap();
    assert!(data.starts_with(b"by-kickvm-backend\n"));
    assert!(data[4096..].starts_with(b"after-restart\n"), "the write after the restart is not on the image");
    let _ = std::fs::remove_dir_all(dir);
}

/// First boot: the guest reloads its virtio-net (vhost-net) and virtio-rng
/// (vhost-user) drivers — a device reset each, the rings stopped and set up
/// again — marks the vhost-user disk and reboots. Second boot (a new VM:
/// new vhost-user connections, new vhost-net fd): the mark is there and
/// ping works again.
const RELOAD_SCRIPT: &str = r#"
set -e
if [ "$(head -c 8 /dev/vda)" = "rebooted" ]; then
    ping -c 3 -W 3 10.0.2.2 >/dev/null
    test "$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | wc -c)" = 32
    echo second-boot-ok
    exit 0
fi
ping -c 3 -W 3 10.0.2.2 >/dev/null
echo vhost-net-ping-ok
for d in /sys/bus/virtio/devices/*; do
    drv=$(basename "$(readlink "$d/driver")")
    case $drv in virtio_net|virtio_rng)
        echo "$(basename "$d")" > "/sys/bus/virtio/drivers/$drv/unbind"
        echo "$(basename "$d")" > "/sys/bus/virtio/drivers/$drv/bind"
        echo "reloaded $drv" ;;
    esac
done
ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up
ping -c 5 -w 20 10.0.2.2 >/dev/null
test "$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | wc -c)" = 32
echo after-reload-ok
printf rebooted > /dev/vda
sync
reboot -f
"#;

#[test]
fn vhost_net_and_vhost_user_survive_driver_reload_and_reboot() {
    in_rig!("vhost_net_and_vhost_user_survive_driver_reload_and_reboot");
    if !Path::new("/dev/vhost-net").exists() {
        eprintln!("skipped: no /dev/vhost-net (modprobe vhost_net)");
        return;
    }
    assert!(tap("vhtap0", "10.0.2.2/24", false), "cannot create TAP vhtap0 (needs root and iproute2)");
    let dir = scratch("reload");
    let flag = image(&dir, "flag.img", 1 << 20);
    let sock = |n: &str| dir.join(n);
    let _blk = Backend::kickvm("blk", &sock("blk.sock"), &format!("path={}", flag.display()));
    let _rng = Backend::kickvm("rng", &sock("rng.sock"), "");
    let args: Vec<String> = vec![
        "--net".into(),
        "tap=vhtap0,vhost=on".into(),
        "--vhost-user".into(),
        format!("blk,socket={}", sock("blk.sock").display()),
        "--vhost-user".into(),
        format!("rng,socket={}", sock("rng.sock").display()),
    ];
    let (status, out, stderr) = boot(&args, RELOAD_SCRIPT, Duration::from_secs(300), |_| {});
    let _ = Command::new("ip").args(["link", "del", "vhtap0"]).status();
    assert_eq!(kickvm_rig::image::parse_exit_status(&out), Some(0), "guest script failed:\n{out}\nstderr: {stderr}");
    assert_eq!(status, Some(0), "kickvm status; stderr: {stderr}");
    for step in ["vhost-net-ping-ok", "reloaded virtio_net", "reloaded virtio_rng", "after-reload-ok", "second-boot-ok"] {
        assert!(out.contains(step), "no {step}:\n{out}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

// ---- set-up mistakes and a live back-end, with a tiny guest (no rig) ----

/// `kickvm run ARGS` with a 30-byte guest that powers off at once:
/// (status, stderr).
fn run_tiny(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let code = common::serial_then_out(b"", 0x3c0, 0x34);
    let k = common::write(dir, "bzImage", &common::fake_bzimage(&code));
    let mut v = vec!["run", "--allow-slow-kvm", "--kernel", k.to_str().unwrap()];
    v.extend_from_slice(args);
    let out = common::run(&v);
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// One error line on stderr, status 1, with every needle (log lines of
/// the set-up before it, such as the host's huge-page advice for shared
/// RAM, may precede it).
fn one_line_error(dir: &Path, args: &[&str], needles: &[&str]) {
    let (status, stderr) = run_tiny(dir, args);
    assert_eq!(status, Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| !l.starts_with('[')).collect();
    assert_eq!(errors.len(), 1, "want one error line, got: {stderr}");
    let stderr = errors[0];
    for n in needles {
        assert!(stderr.contains(n), "`{n}` not in: {stderr}");
    }
}

#[test]
fn vhost_user_and_vhost_net_mistakes_are_one_line() {
    let dir = scratch("errors");
    let file = image(&dir, "not-a-socket", 512);
    let missing = dir.join("missing.sock");
    let m = format!("blk,socket={}", missing.display());
    one_line_error(&dir, &["--vhost-user", &m], &["no such file", "start the back-end first", "kickvm backend blk --socket"]);
    let f = format!("net,socket={}", file.display());
    one_line_error(&dir, &["--vhost-user", &f], &["not a unix socket"]);
    // A socket nobody listens on any more.
    let dead = dir.join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    let d = format!("rng,socket={}", dead.display());
    one_line_error(&dir, &["--vhost-user", &d], &["cannot connect", "is the back-end running?"]);
    one_line_error(&dir, &["--vhost-user", &d, "--vhost-user", &d], &["the socket is given twice"]);
    if !Path::new("/dev/vhost-net").exists() && std::fs::metadata("/dev/net/tun").is_ok() {
        one_line_error(&dir, &["--net", "tap=kvnotap0,vhost=on"], &["/dev/vhost-net: no such file", "modprobe vhost_net"]);
    }
    one_line_error(&dir, &["--net", "tap=kvnotap0,queues=2,vhost=on"], &["vhost-net serves one queue pair here"]);
    let _ = std::fs::remove_dir_all(dir);
}

/// A live back-end: the launcher connects, negotiates, reads nothing it
/// should not, and lets go at power-off without hanging on its
/// `<dev>-vhost` thread; the back-end then serves the next frontend.
#[test]
fn a_tiny_guest_with_a_vhost_user_device_starts_and_stops() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = scratch("tiny");
    let sock = dir.join("rng.sock");
    let _rng = Backend::kickvm("rng", &sock, "");
    let arg = format!("rng,socket={}", sock.display());
    for boot in 0..2 {
        let (status, stderr) = run_tiny(&dir, &["--vhost-user", &arg, "--memory", "64M"]);
        assert_eq!(status, Some(0), "boot {boot}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
