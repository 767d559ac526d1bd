//! The launcher's stdin thread, started as `kickvm run` starts it, is
//! refused what it never needs: the bytes it reads reach a serial-port
//! sink whose `push` runs on that very thread, and there tries to make a
//! socket, open a file and start a program. Run in a child process (this
//! test binary again) whose stdin is a pipe the test writes.

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
