//! A `kickvm --api-socket` process and clients for it: curl (a client
//! none of us wrote) for the endpoints, and a raw socket client for what
//! curl cannot do (pass a descriptor, hold a connection silent).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `kickvm --api-socket`; killed when dropped.
pub struct Api {
    pub child: Child,
    pub sock: PathBuf,
    pub dir: PathBuf,
}

/// Why a test cannot run here, or `None`.
pub fn missing(need_kvm: bool) -> Option<&'static str> {
    if Command::new("curl").arg("--version").stdout(Stdio::null()).status().is_err() {
        return Some("no curl (scripts/install-deps.sh installs it)");
    }
    if need_kvm && !Path::new("/dev/kvm").exists() {
        return Some("no /dev/kvm");
    }
    None
}

impl Api {
    /// Starts kickvm on a fresh socket and waits until `vmm.ping` answers.
    pub fn start(dir: &Path) -> Api {
        let sock = dir.join("api.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_kickvm"))
            .args(["--api-socket", sock.to_str().unwrap(), "--allow-slow-kvm", "-v"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start kickvm");
        let api = Api { child, sock, dir: dir.to_path_buf() };
        let t0 = Instant::now();
        while api.curl("GET", "vmm.ping", None).0 != 200 {
            assert!(t0.elapsed() < Duration::from_secs(10), "kickvm --api-socket did not answer vmm.ping within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        api
    }

    /// One request with curl: (HTTP status, body). Status 0: no answer.
    pub fn curl(&self, method: &str, endpoint: &str, body: Option<&str>) -> (u16, String) {
        let mut c = Command::new("curl");
        c.args(["-s", "--max-time", "20", "--unix-socket", self.sock.to_str().unwrap(), "-X", method]);
        c.args(["-w", "\n%{http_code}"]);
        if let Some(b) = body {
            c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        c.arg(format!("http://localhost/api/v1/{endpoint}"));
        let out = c.output().expect("cannot run curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// `vm.info`'s `state`.
    pub fn state(&self) -> String {
        let (code, body) = self.curl("GET", "vm.info", None);
        assert_eq!(code, 200, "vm.info: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["state"].as_str().unwrap().to_string()
    }

    /// Asks kickvm to exit and checks it is gone within 3 s with its socket.
    pub fn exit_within_3s(mut self) -> String {
        let (code, body) = self.curl("PUT", "vmm.shutdown", None);
        assert_eq!(code, 204, "vmm.shutdown: {body}");
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "kickvm exited with {status}");
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(3), "kickvm still runs 3 s after vmm.shutdown");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!self.sock.exists(), "the API socket file is left behind");
        let mut out = String::new();
        self.child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        out
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One raw HTTP/1.1 request on `s`, with `fds` passed alongside its
/// bytes; returns (status, body).
pub fn raw_request(s: &UnixStream, method: &str, endpoint: &str, body: &str, fds: &[i32]) -> (u16, String) {
    let req = format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    send_with_fds(s, req.as_bytes(), fds);
    read_response(s)
}

/// Sends `bytes` in one sendmsg with `fds` as SCM_RIGHTS.
pub fn send_with_fds(s: &UnixStream, bytes: &[u8], fds: &[i32]) {
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut _, iov_len: bytes.len() };
    let fd_bytes = std::mem::size_of_val(fds);
    let mut cmsg = vec![0u64; 64];
    // SAFETY: an all-zero msghdr is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cmsg.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is arithmetic.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as _;
        // SAFETY: the control buffer (512 bytes) holds one header and the fds.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), fd_bytes);
        }
    }
    // SAFETY: `msg` points at live buffers of the sizes given.
    let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, 0) };
    assert_eq!(n, bytes.len() as isize, "sendmsg: {}", std::io::Error::last_os_error());
}

/// Reads one response (head and Content-Length body).
pub fn read_response(mut s: &UnixStream) -> (u16, String) {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
                return (status, String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string());
            }
        }
        let n = s.read(&mut chunk).expect("reading a response");
        assert!(n > 0, "connection closed before a whole response: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Writes `bytes` and reads what comes back until the server closes.
pub fn exchange(sock: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A guest of a few instructions: prints `msg` on COM1 and halts (the VM
/// stays Running, its vCPU asleep in KVM).
pub fn halting_guest(dir: &Path, msg: &[u8]) -> PathBuf {
    let code = crate::common::serial_then_out(msg, 0x80, 0);
    crate::common::write(dir, "bzImage", &crate::common::fake_bzimage(&code))
}

/// `vm.create`'s body for `kernel`: serial on stdout, no virtio-console.
pub fn create_body(kernel: &Path) -> String {
    serde_json::json!({
        "payload": { "kernel": kernel },
        "cpus": { "boot_vcpus": 2, "max_vcpus": 2 },
        "memory": { "size": 16u64 << 20 },
        "serial": { "mode": "Tty" },
        "console": { "mode": "Off" },
    })
    .to_string()
}
