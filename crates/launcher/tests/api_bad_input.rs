//! What careless and hostile API clients send — malformed JSON, unknown
//! endpoints, wrong methods, requests out of order, huge bodies, silence,
//! a crowd — gets one clear line with a 4xx, and neither the VMM nor its
//! running guest notices.

mod api_common;
mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use api_common::*;

/// An error with `status` whose body is Cloud Hypervisor's shape (a JSON
/// list of messages) holding one line that contains `words`.
fn refused(got: (u16, String), status: u16, words: &str) {
    let (code, body) = got;
    assert_eq!(code, status, "{body}");
    assert_eq!(body.trim_end().lines().count(), 1, "not one line: {body:?}");
    let msgs: Vec<String> = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(msgs.len(), 1, "{body}");
    assert!(msgs[0].contains(words), "`{words}` not in: {}", msgs[0]);
}

#[test]
fn bad_requests_get_one_line_and_the_guest_runs_on() {
    if let Some(why) = missing(true) {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = common::scratch("api-bad");
    let api = Api::start(&dir);
    let kernel = halting_guest(&dir, b"still here\n");

    // Out of order.
    refused(api.curl("PUT", "vm.boot", None), 409, "vm.create first");
    refused(api.curl("GET", "vm.info", None), 409, "vm.create first");
    refused(api.curl("GET", "vm.counters", None), 409, "not running");
    refused(api.curl("PUT", "vm.shutdown", None), 409, "vm.create first");
    refused(api.curl("PUT", "vm.add-disk", Some(r#"{"path":"/x"}"#)), 409, "vm.create first");
    refused(api.curl("PUT", "vm.power-button", None), 409, "vm.create first");
    refused(api.curl("PUT", "vm.remove-device", Some(r#"{"id":"blk0"}"#)), 409, "vm.create first");

    // Malformed or unfit configurations, before any VM exists.
    refused(api.curl("PUT", "vm.create", Some(r#"{"payload":{"kernel":"#)), 400, "not valid JSON");
    refused(api.curl("PUT", "vm.create", Some("")), 400, "needs a body");
    refused(api.curl("PUT", "vm.create", Some(r#"{"payload":{"kernel":"/no/such/kernel"}}"#)), 400, "/no/such/kernel");
    refused(api.curl("PUT", "vm.create", Some(r#"{"payload":{"kernel":"/k"},"fs":[{}]}"#)), 400, "virtio-fs");
    refused(api.curl("PUT", "vm.create", Some(r#"{"cpus":"many"}"#)), 400, "VmConfig");

    assert_eq!(api.curl("PUT", "vm.create", Some(&create_body(&kernel))).0, 204);
    refused(api.curl("PUT", "vm.power-button", None), 409, "not running");
    refused(api.curl("PUT", "vm.remove-device", Some(r#"{"id":"blk0"}"#)), 409, "not running");
    assert_eq!(api.curl("PUT", "vm.boot", None).0, 204);

    // With the guest running.
    refused(api.curl("PUT", "vm.create", Some(&create_body(&kernel))), 409, "already created");
    refused(api.curl("PUT", "vm.boot", None), 409, "already running");
    refused(api.curl("GET", "vm.nonsense", None), 404, "unknown endpoint");
    refused(api.curl("GET", "../../etc/passwd", None), 404, "not found");
    refused(api.curl("GET", "vm.boot", None), 405, "takes PUT");
    refused(api.curl("DELETE", "vmm.ping", None), 405, "takes GET");
    refused(api.curl("PUT", "vm.add-net", Some(r#"{"num_queues":"two"}"#)), 400, "expected JSON");
    // Hotplug requests that cannot be: nothing plugged in or taken out.
    refused(api.curl("PUT", "vm.add-disk", Some(r#"{"path":"/no/such/disk"}"#)), 400, "/no/such/disk");
    refused(api.curl("PUT", "vm.add-net", Some(r#"{"tap":"kvnope0"}"#)), 400, "comes with its TAP fd");
    refused(api.curl("PUT", "vm.remove-device", Some(r#"{"id":"rng0"}"#)), 400, "only disks");
    refused(api.curl("PUT", "vm.remove-device", Some(r#"{"id":"blk0"}"#)), 400, "there is none");
    refused(api.curl("PUT", "vm.remove-device", Some("{}")), 400, "expected JSON");
    refused(api.curl("PUT", "vm.resize", Some(r#"{"desired_ram":"lots"}"#)), 400, "expected JSON");

    // What curl sends as asked, and raw bytes no client should send.
    let sock = api.sock.to_str().unwrap().to_string();
    let curl_raw = |args: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-s", "--max-time", "20", "--unix-socket", &sock, "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse::<u16>().unwrap_or(0), body.to_string())
    };
    let ping = "http://localhost/api/v1/vmm.ping";
    refused(curl_raw(&["-X", "PUT", "-d", "{}", "http://localhost/api/v1/vm.resize"]), 415, "application/json");
    // No Content-Type at all is JSON (ch-remote sends none).
    let untyped = exchange(&api.sock, b"PUT /api/v1/vm.resize HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
    assert!(untyped.starts_with("HTTP/1.1 204 "), "{untyped}");
    refused(curl_raw(&["-H", "Transfer-Encoding: chunked", "-H", "Content-Type: application/json", "-X", "PUT", "-d", "{}", ping]), 411, "Content-Length");
    let huge = dir.join("huge.json");
    std::fs::write(&huge, vec![b' '; 2 << 20]).unwrap();
    refused(
        curl_raw(&["-X", "PUT", "-H", "Content-Type: application/json", "--data-binary", &format!("@{}", huge.display()), "http://localhost/api/v1/vm.create"]),
        413,
        "limit",
    );
    let long_header = format!("X-Long: {}", "a".repeat(20 << 10));
    refused(curl_raw(&["-H", &long_header, ping]), 431, "smaller request");
    assert!(exchange(&api.sock, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").starts_with("HTTP/1.1 400 "));
    assert!(exchange(&api.sock, b"GET /api/v1/vmm.ping HTTP/1.1\r\nContent-Length: -1\r\n\r\n").starts_with("HTTP/1.1 400 "));

    // The guest never noticed: still running, printed once, no reboot.
    assert_eq!(api.state(), "Running");
    let out = api.exit_within_3s();
    assert_eq!(out, "still here\n");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn silent_clients_and_a_crowd_do_not_stop_the_server() {
    if let Some(why) = missing(false) {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = common::scratch("api-crowd");
    let api = Api::start(&dir);

    // 100 concurrent clients, each a keep-alive connection of 10 requests.
    let t0 = Instant::now();
    let clients: Vec<_> = (0..100)
        .map(|_| {
            let sock = api.sock.clone();
            std::thread::spawn(move || {
                let s = UnixStream::connect(&sock).unwrap();
                (0..10).map(|_| raw_request(&s, "GET", "vmm.ping", "", &[]).0).filter(|&c| c == 200).count()
            })
        })
        .collect();
    let ok: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    assert_eq!(ok, 1000, "of 1000 pings from 100 concurrent clients");
    eprintln!("1000 pings over 100 concurrent connections in {:?}", t0.elapsed());

    // Clients that connect and never send, one that stops half-way, and
    // then more than the server takes at once: the next is told to retry,
    // and the server serves again once the silent ones time out.
    let mut silent: Vec<UnixStream> = (0..127).map(|_| UnixStream::connect(&api.sock).unwrap()).collect();
    let mut half = UnixStream::connect(&api.sock).unwrap();
    half.write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{").unwrap();
    silent.push(half.try_clone().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let busy = exchange(&api.sock, b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n");
    assert!(busy.starts_with("HTTP/1.1 503 ") && busy.contains("retry later"), "{busy}");
    let t0 = Instant::now();
    let timed_out = read_response(&half);
    assert_eq!(timed_out.0, 408, "{timed_out:?}");
    assert!(t0.elapsed() < Duration::from_secs(12), "the half request was held {:?}", t0.elapsed());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(api.curl("GET", "vmm.ping", None).0, 200);
    drop(silent);
    api.exit_within_3s();
    let _ = std::fs::remove_dir_all(dir);
}
