//! The sandbox of kickvm's processes, seen from outside. The launcher's
//! stdin thread, started as `kickvm run` starts it, is refused what it
//! never needs: the bytes it reads reach a serial-port
//! sink whose `push` runs on that very thread, and there tries to make a
//! socket, open a file and start a program. Run in a child process (this
//! test binary again) whose stdin is a pipe the test writes. And the
//! `kickvm backend` binary drops its user, privileges and inherited fds.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use kickvm::serial::{InputSink, StdinPump};
use kickvm_virtio::seccomp::{self, SeccompMode};

struct Probe(std::sync::mpsc::Sender<([(i64, i32); 3], String)>);

impl InputSink for Probe {
    fn push(&mut self, input: &[u8]) -> usize {
        let _ = self.0.send(seccomp::attempt_forbidden());
        input.len()
    }
}

#[test]
fn the_stdin_thread_is_refused_sockets_files_and_programs() {
    if std::env::var("KICKVM_SANDBOX_STDIN_CHILD").is_ok() {
        let (tx, rx) = std::sync::mpsc::channel();
        let pump = StdinPump::start(SeccompMode::On).expect("stdin thread");
        let sink: Arc<Mutex<dyn InputSink>> = Arc::new(Mutex::new(Probe(tx)));
        pump.set_target(Some(sink));
        let (r, name) = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("a key reached the sink");
        println!("child: thread {name} got {r:?}");
        std::process::exit(if name == "stdin" && r == seccomp::ALL_REFUSED { 0 } else { 1 });
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "the_stdin_thread_is_refused_sockets_files_and_programs", "--nocapture", "--test-threads=1"])
        .env("KICKVM_SANDBOX_STDIN_CHILD", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // The pump may read before the sink is set: keep typing until it is.
    let typist = std::thread::spawn(move || {
        for _ in 0..200 {
            if stdin.write_all(b"x").is_err() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    });
    let out = child.wait_with_output().unwrap();
    let _ = typist.join();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("child: thread stdin got [(-1, 1), (-1, 1), (-1, 1)]"), "{text}");
}

/// `kickvm backend` as a process, started as root with `--user`: once it
/// listens it runs as that user with no supplementary groups, with
/// no_new_privs, not dumpable (its /proc files belong to root), its main
/// thread filtered; the fd it was started with beyond stderr is closed.
/// Skipped unless root (only root can change user).
#[test]
fn a_backend_started_as_root_drops_to_its_user_and_keeps_no_inherited_fd() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (--user changes the user)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("kickvm-sandbox-user-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("rng.sock");
    let inherited = std::fs::File::open("/proc/self/status").unwrap();
    let raw = std::os::fd::AsRawFd::as_raw_fd(&inherited);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kickvm"));
    cmd.args(["backend", "rng", "--once", "--user", "65534:65534", "--socket"]).arg(&socket);
    // Hand the child fd 9, without close-on-exec, as a careless parent would.
    // SAFETY: dup2 only, between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::dup2(raw, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !socket.exists() {
        assert!(std::time::Instant::now() < end, "the back-end listens");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // The user changes after bind, the filter comes after; wait for both.
    let status = loop {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        if (s.contains("Uid:\t65534") && s.contains("Seccomp:\t2")) || std::time::Instant::now() > end {
            break s;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "));
    let fd9 = std::fs::read_link(format!("/proc/{pid}/fd/9")).is_ok();
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(format!("/proc/{pid}/mem")).unwrap());
    drop(std::os::unix::net::UnixStream::connect(&socket).unwrap());
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(field("Uid:").as_deref(), Some("65534 65534 65534 65534"));
    assert_eq!(field("Gid:").as_deref(), Some("65534 65534 65534 65534"));
    assert_eq!(field("Groups:").as_deref(), Some(""));
    assert_eq!(field("NoNewPrivs:").as_deref(), Some("1"));
    assert_eq!(field("Seccomp:").as_deref(), Some("2"), "the main thread is filtered");
    assert!(!fd9, "the inherited fd 9 is closed");
    assert_eq!(owner, 0, "not dumpable: its /proc files belong to root, not to 65534");
}
