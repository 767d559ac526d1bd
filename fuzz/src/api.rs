//! The `api` target: bytes a client writes to `kickvm --api-socket`, cut
//! into reads of a size the input chooses, through the HTTP framing
//! (`kickvm::api::http::parse`) and, request by request, into the VMM's
//! handler: routing, Cloud Hypervisor's JSON shapes, their translation
//! into a `VmConfig` and `validate()`, the state machine (create, add-disk,
//! add-net, resize, boot, delete, ...).
//!
//! No VM ever starts: the VMM's KVM device is `/dev/null`, so `vm.boot`
//! fails after every check has passed. Paths in JSON bodies are confined
//! to the `cli` target's sandbox (`validate` opens files) by file name, so
//! seeds say `"kernel"` and mean the sandbox's bzImage.
//!
//! Checks besides "no panic, no hang": every response is a status from
//! 200 to 599; an error body is a JSON list of one non-empty one-line
//! message; a 200 body is JSON.

use std::path::Path;

use kickvm::api::http::{self, Parse, Request, Response};
use kickvm::api::{HostOptions, Vmm};

use crate::checks;

/// Keys whose string values are host paths.
const PATH_KEYS: [&str; 6] = ["kernel", "initramfs", "firmware", "path", "file", "socket"];

fn confine_paths(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if let (true, serde_json::Value::String(s)) = (PATH_KEYS.contains(&k.as_str()), &*x) {
                    *x = serde_json::Value::String(crate::cli::confine(Path::new(s)).to_string_lossy().into_owned());
                } else {
                    confine_paths(x);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(confine_paths),
        _ => {}
    }
}

fn check(resp: &Response) {
    assert!((200..600).contains(&resp.status), "status {}", resp.status);
    if resp.status >= 400 {
        let msg = resp.message().unwrap_or_else(|| panic!("error body is not a list of messages: {:?}", resp.body));
        assert!(!msg.is_empty() && !msg.contains('\n'), "error message {msg:?}");
        assert_eq!(resp.body.trim_end().lines().count(), 1, "error body of more than one line: {:?}", resp.body);
    } else if resp.status == 200 {
        serde_json::from_str::<serde_json::Value>(&resp.body).expect("a 200 body is JSON");
    }
}

pub fn run(data: &[u8]) {
    checks::log_begin();
    let sandbox = crate::cli::sandbox();
    let vmm = Vmm::new(HostOptions {
        threads: kickvm_virtio::ThreadingMode::PerQueue,
        seccomp: kickvm_virtio::seccomp::SeccompMode::Off,
        decompress_in_guest: false,
        kvm_device: sandbox.join("null"),
        allow_slow_kvm: true,
    });
    let (read_size, stream) = match data.split_first() {
        Some((&n, rest)) => (usize::from(n % 64) + 1, rest),
        None => (1, data),
    };
    let mut buf = Vec::new();
    'reads: for chunk in stream.chunks(read_size) {
        buf.extend_from_slice(chunk);
        loop {
            match http::parse(&buf) {
                Parse::Partial => break,
                Parse::Bad(resp) => {
                    check(&resp);
                    break 'reads;
                }
                Parse::Complete { method, path, content_type, body, close, used } => {
                    let mut body = buf[body].to_vec();
                    if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body) {
                        confine_paths(&mut v);
                        body = v.to_string().into_bytes();
                    }
                    let req = Request { method, path, content_type, body, fds: Vec::new(), close };
                    check(&vmm.handle(req));
                    buf.drain(..used);
                    if close || vmm.exit.load(std::sync::atomic::Ordering::SeqCst) {
                        break 'reads;
                    }
                }
            }
        }
    }
    vmm.stop_for_exit();
    checks::log_end();
}
