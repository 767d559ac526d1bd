//! virtio-console against a real pty, a unix socket, a file, and the
//! process's own stdin/stdout.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kickvm_virtio::console::{Backend, Console};
use kickvm_virtio::driver::{Buf, Harness, HarnessOpts};
use kickvm_virtio::ThreadingMode;

const T: Duration = Duration::from_secs(5);
const RX: usize = 0;
const TX: usize = 1;

fn start(backend: Backend, mode: ThreadingMode) -> (Harness, Option<std::path::PathBuf>) {
    let c = Console::new("con0", backend).expect("open console backend");
    let pty = c.pty_path().map(|p| p.to_path_buf());
    (Harness::start(Box::new(c), HarnessOpts { mode, ..Default::default() }).expect("activate"), pty)
}

/// Gives the device one receive buffer; returns its address.
fn post_rx(h: &mut Harness, len: u32) -> vm_memory::GuestAddress {
    let a = h.guest.alloc(u64::from(len), 16);
    h.queues[RX].post(&[Buf::inb(a, len)]).unwrap();
    h.queues[RX].kick();
    a
}

fn send_tx(h: &mut Harness, data: &[u8]) {
    let a = h.guest.alloc_bytes(data);
    h.queues[TX].post(&[Buf::out(a, data.len() as u32)]).unwrap();
    h.queues[TX].kick();
    assert!(h.queues[TX].wait_used(T).is_some(), "output chain completes");
}

fn read_exactly(r: &mut impl Read, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    r.read_exact(&mut v).unwrap();
    v
}

#[test]
fn pty_carries_input_and_output_in_every_mode() {
    for mode in [ThreadingMode::PerQueue, ThreadingMode::PerDevice, ThreadingMode::Single] {
        let (mut h, pty) = start(Backend::Pty, mode);
        let pty = pty.expect("pty path");
        let mut term = std::fs::OpenOptions::new().read(true).write(true).open(&pty).unwrap();
        let rx = post_rx(&mut h, 64);
        // Let the receive thread block first: input must wake it.
        std::thread::sleep(Duration::from_millis(50));
        term.write_all(b"hello").unwrap();
        let (_, len) = h.queues[RX].wait_used(T).expect("input lands in the guest");
        assert_eq!(h.guest.read(rx, len as usize), b"hello", "{mode}");
        send_tx(&mut h, b"world\r\n");
        assert_eq!(read_exactly(&mut term, 7), b"world\r\n", "{mode}");
        let c = h.device.state();
        assert_eq!((c.queue(RX).bytes, c.queue(TX).bytes), (5, 7), "{mode}");
    }
}

#[test]
fn reset_stops_a_receive_thread_blocked_on_input() {
    let (mut h, _pty) = start(Backend::Pty, ThreadingMode::PerQueue);
    post_rx(&mut h, 64);
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    h.reset();
    assert!(t.elapsed() < Duration::from_millis(200), "stop took {:?}", t.elapsed());
}

#[test]
fn unix_socket_serves_one_client_after_another() {
    let path = std::env::temp_dir().join(format!("kickvm-con-{}.sock", std::process::id()));
    let (mut h, _) = start(Backend::Socket(path.clone()), ThreadingMode::PerQueue);
    for round in 0..2u8 {
        let mut s = UnixStream::connect(&path).unwrap();
        let rx = post_rx(&mut h, 64);
        s.write_all(&[b'a' + round; 3]).unwrap();
        let (_, len) = h.queues[RX].wait_used(T).expect("socket input lands in the guest");
        assert_eq!(h.guest.read(rx, len as usize), vec![b'a' + round; 3]);
        send_tx(&mut h, b"out");
        assert_eq!(read_exactly(&mut s, 3), b"out");
    }
    drop(h);
    assert!(!path.exists(), "socket removed when the device goes");
}

#[test]
fn output_file_receives_the_guest_output() {
    let path = std::env::temp_dir().join(format!("kickvm-con-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let (mut h, _) = start(Backend::File(path.clone()), ThreadingMode::PerQueue);
    send_tx(&mut h, b"line one\n");
    send_tx(&mut h, b"line two\n");
    assert_eq!(std::fs::read(&path).unwrap(), b"line one\nline two\n");
    let _ = std::fs::remove_file(&path);
}

/// Child side of the stdio tests: echo one input line back as output.
#[test]
#[ignore = "run by the stdio tests as a child process"]
fn stdio_child() {
    let (mut h, _) = start(Backend::Stdio, ThreadingMode::PerQueue);
    // SAFETY: tcgetattr on fd 0 into a zeroed termios.
    let raw = unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        libc::tcgetattr(0, &mut t) == 0 && t.c_lflag & libc::ICANON == 0
    };
    eprintln!("CHILD-RAW={raw}");
    if std::env::var("KICKVM_CHILD_PANIC").is_ok() {
        panic!("child panics while the terminal is raw");
    }
    if std::env::var("KICKVM_CHILD_ECHO").is_ok() {
        let rx = post_rx(&mut h, 64);
        let (_, len) = h.queues[RX].wait_used(T).expect("stdin input");
        let got = h.guest.read(rx, len as usize);
        send_tx(&mut h, &[b"echo:".as_slice(), &got].concat());
    }
}

fn child(envs: &[(&str, &str)]) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "stdio_child", "--ignored", "--nocapture", "--test-threads=1", "-q"]);
    for (k, v) in envs {
        c.env(k, v);
    }
    c
}

#[test]
fn stdio_input_and_output_through_pipes() {
    let mut c = child(&[("KICKVM_CHILD_ECHO", "1")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.as_mut().unwrap().write_all(b"ping").unwrap();
    let out = c.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("echo:ping"), "stdout: {stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("CHILD-RAW=false"), "a pipe is not put in raw mode");
}

fn open_pty() -> (std::fs::File, std::fs::File) {
    let (mut m, mut s) = (-1, -1);
    // SAFETY: openpty fills two fds.
    assert_eq!(unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) }, 0);
    // SAFETY: fresh fds owned by us.
    unsafe { (std::os::fd::FromRawFd::from_raw_fd(m), std::os::fd::FromRawFd::from_raw_fd(s)) }
}

fn lflag(f: &std::fs::File) -> libc::tcflag_t {
    // SAFETY: tcgetattr on a tty fd into a zeroed termios.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(f.as_raw_fd(), &mut t), 0);
        t.c_lflag
    }
}

#[test]
fn a_terminal_is_raw_while_the_console_lives_and_restored_after_even_on_panic() {
    for panic in [false, true] {
        let (master, slave) = open_pty();
        let before = lflag(&slave);
        assert_ne!(before & libc::ICANON, 0);
        let mut cmd = child(if panic { &[("KICKVM_CHILD_PANIC", "1")] } else { &[] });
        let out = cmd
            .stdin(slave.try_clone().unwrap())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("CHILD-RAW=true"), "raw while running: {err}");
        assert_eq!(out.status.success(), !panic);
        assert_eq!(lflag(&slave), before, "terminal settings restored (panic={panic})");
        drop(master);
    }
}
