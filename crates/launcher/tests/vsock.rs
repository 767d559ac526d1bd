//! virtio-vsock end to end: `kickvm run --vsock` boots the default guest
//! image, whose Linux vsock driver and `socat` talk to host programs
//! through the hybrid vsock Unix sockets — one boot, both directions of
//! connection, 1 MiB each way checked with MD5 on both sides.
//!
//! Like the other end-to-end tests, this re-runs itself inside the nested
//! rig where the host's KVM cannot run a stock kernel (docs/testing.md).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kickvm_rig::image::script_cmdline;

const MIB: usize = 1 << 20;

/// The guest: makes 1 MiB of random data, serves one connection on vsock
/// port 1024 (sends that data, stores what it receives), prints both
/// MD5s, then connects to the host's port 5000 and prints the reply.
const GUEST_SCRIPT: &str = r#"
set -e
head -c 1048576 /dev/urandom > /tmp/up
echo "guest-up-md5 $(md5sum < /tmp/up | cut -d' ' -f1)"
socat -t 60 VSOCK-LISTEN:1024 SYSTEM:'cat /tmp/up & cat > /tmp/down; wait' &
pid=$!
echo guest-listening
wait $pid
echo "guest-down-md5 $(md5sum < /tmp/down | cut -d' ' -f1) $(wc -c < /tmp/down)"
reply=$(echo hello-from-the-guest | socat -t 30 - VSOCK-CONNECT:2:5000)
echo "guest got: $reply"
"#;

fn md5(data: &[u8]) -> String {
    let mut child = Command::new("md5sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("md5sum");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let w = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    w.join().unwrap().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

/// The console line that starts with `prefix`, waiting up to `until`.
fn console_line(lines: &mpsc::Receiver<String>, seen: &mut Vec<String>, prefix: &str, until: Instant) -> String {
    loop {
        if let Some(l) = seen.iter().find(|l| l.starts_with(prefix)) {
            return l.clone();
        }
        let left = until.checked_duration_since(Instant::now()).unwrap_or_else(|| {
            panic!("no `{prefix}` on the console:\n{}", seen.join("\n"))
        });
        match lines.recv_timeout(left) {
            Ok(l) => seen.push(l.trim_end().to_string()),
            Err(_) => panic!("no `{prefix}` on the console:\n{}", seen.join("\n")),
        }
    }
}

/// `CONNECT <port>` through the hybrid vsock socket, retried while the
/// guest's listener is not up yet (the device answers with EOF then).
fn connect(socket: &Path, port: u32, until: Instant) -> Option<UnixStream> {
    loop {
        if Instant::now() > until {
            return None;
        }
        let Ok(mut s) = UnixStream::connect(socket) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.last() != Some(&b'\n') && matches!(s.read(&mut b), Ok(1)) {
            line.push(b[0]);
        }
        if line.starts_with(b"OK ") {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn guest_socat_moves_a_mebibyte_each_way_over_hybrid_vsock() {
    if let Some(passed) = kickvm_rig::reexec_test_in_rig_if_needed("guest_socat_moves_a_mebibyte_each_way_over_hybrid_vsock") {
        assert!(passed, "failed inside the rig");
        return;
    }
    let dir = common::scratch("vsock");
    let socket = dir.join("v.sock");
    let outbound = UnixListener::bind(format!("{}_5000", socket.display())).unwrap();
    outbound.set_nonblocking(true).unwrap();
    let img = kickvm_rig::default_image().expect("default guest image");
    let cmdline = format!("loglevel=4 {}", script_cmdline(GUEST_SCRIPT));
    let vsock = format!("cid=3,socket={}", socket.display());
    let t0 = Instant::now();
    let mut child = common::kickvm()
        .arg("run")
        .arg("--kernel")
        .arg(&img.kernel)
        .arg("--initrd")
        .arg(&img.initrd)
        .args(["--cmdline", &cmdline, "--vsock", &vsock])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start kickvm");
    let (tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let until = t0 + Duration::from_secs(90);
    let kill_on_panic = scopeguard(child.id());
    let mut seen = Vec::new();

    // Host → guest connection on port 1024: 1 MiB each way.
    console_line(&lines, &mut seen, "guest-listening", until);
    let Some(s) = connect(&socket, 1024, until) else {
        // SAFETY: kills our own child, so that its output ends.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        seen.extend(lines.iter().take_while(|_| true).map(|l| l.trim_end().to_string()));
        panic!("the guest never accepted CONNECT 1024:\n{}\n{}", seen.join("\n"), err_reader.join().unwrap_or_default());
    };
    let connected = t0.elapsed();
    let down: Vec<u8> = (0..MIB).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect();
    let mut w = s.try_clone().unwrap();
    let sent = down.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&sent).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let moved = Instant::now();
    let mut up = Vec::new();
    (&s).read_to_end(&mut up).unwrap();
    writer.join().unwrap();
    let transfer = moved.elapsed();
    assert_eq!(up.len(), MIB, "the guest's mebibyte arrives whole");
    let up_line = console_line(&lines, &mut seen, "guest-up-md5 ", until);
    assert_eq!(up_line, format!("guest-up-md5 {}", md5(&up)), "guest → host intact");
    let down_line = console_line(&lines, &mut seen, "guest-down-md5 ", until);
    assert_eq!(down_line, format!("guest-down-md5 {} {MIB}", md5(&down)), "host → guest intact");

    // Guest → host connection to port 5000: reaches SOCKET_5000.
    let mut c = loop {
        match outbound.accept() {
            Ok((c, _)) => break c,
            Err(_) if Instant::now() < until => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("the guest never connected to port 5000: {e}\n{}", seen.join("\n")),
        }
    };
    c.set_nonblocking(false).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut hello = [0u8; 21];
    c.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"hello-from-the-guest\n");
    c.write_all(b"reply-from-the-host\n").unwrap();
    drop(c);
    console_line(&lines, &mut seen, "guest got: reply-from-the-host", until);

    let status = child.wait().unwrap();
    drop(kill_on_panic);
    let _ = reader.join();
    seen.extend(lines.try_iter());
    let stderr = err_reader.join().unwrap_or_default();
    assert_eq!(kickvm_rig::image::parse_exit_status(&seen.join("\n")), Some(0), "{}\n{stderr}", seen.join("\n"));
    assert!(status.success(), "kickvm: {stderr}");
    assert!(!socket.exists(), "kickvm removes its vsock socket");
    eprintln!(
        "vsock e2e: connected {:.1} s after launch; 1 MiB each way in {:.2} s; all done in {:.1} s",
        connected.as_secs_f64(),
        transfer.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Kills kickvm if the test panics before it exits.
struct KillOnDrop(i32);

fn scopeguard(pid: u32) -> KillOnDrop {
    KillOnDrop(pid as i32)
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // SAFETY: kills our own child.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}
