//! HTTP/1.1 on one accepted Unix-socket connection: requests with
//! keep-alive, each with the file descriptors that arrived with its bytes
//! (SCM_RIGHTS: how an orchestrator hands over a TAP).
//!
//! The request line and headers are parsed by `httparse` (hyper's parser).
//! What is written here is the framing around it, which no small crate
//! offers together with descriptor passing: reading with `recvmsg` so the
//! descriptors are kept, a body by `Content-Length`, and the limits that
//! keep a careless or hostile client from holding the VMM's memory or
//! threads.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Request line and headers larger than this are refused (431): no client
/// of this API needs more, and the buffer is per connection.
pub const MAX_HEAD: usize = 16 << 10;
/// Bodies larger than this are refused (413): a VM configuration is a few
/// KiB of JSON.
pub const MAX_BODY: usize = 1 << 20;
/// Descriptors one request may carry (a TAP fd per queue pair).
pub const MAX_FDS: usize = 64;
/// Headers httparse looks at.
const MAX_HEADERS: usize = 32;
/// How long a connection may stay silent, between requests or inside one,
/// before it is closed: a client that connects and never sends holds one
/// thread this long, no more.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// One parsed request.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    /// Descriptors received with this request's bytes, in order.
    pub fds: Vec<OwnedFd>,
    /// The client asked to close the connection after the response.
    pub close: bool,
}

/// A response: status, and a body (JSON, or one line of text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub json: bool,
    pub body: String,
}

impl Response {
    pub fn no_content() -> Response {
        Response { status: 204, json: false, body: String::new() }
    }
    pub fn json(status: u16, body: String) -> Response {
        Response { status, json: true, body }
    }
    /// An error: one line saying what was wrong and what to do, sent as
    /// Cloud Hypervisor sends its errors — a JSON list of messages (here
    /// one), which ch-remote prints line by line.
    pub fn error(status: u16, msg: impl std::fmt::Display) -> Response {
        let line = msg.to_string().replace('\n', " ");
        Response { status, json: true, body: format!("{}\n", serde_json::json!([line])) }
    }

    /// The message of an error response.
    pub fn message(&self) -> Option<String> {
        let list: Vec<String> = serde_json::from_str(&self.body).ok()?;
        list.into_iter().next()
    }

    fn write_to(&self, w: &mut impl Write, close: bool) -> io::Result<()> {
        let ctype = if self.json { "application/json" } else { "text/plain; charset=utf-8" };
        // No reason phrase, as Cloud Hypervisor's server writes it: its
        // client (ch-remote's api_client) parses everything after the
        // version up to the CR as the status number.
        let mut head = format!("HTTP/1.1 {} \r\nServer: kickvm\r\n", self.status);
        if self.status != 204 {
            head.push_str(&format!("Content-Type: {ctype}\r\nContent-Length: {}\r\n", self.body.len()));
        }
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if self.status != 204 {
            out.extend_from_slice(self.body.as_bytes());
        }
        w.write_all(&out)
    }
}

/// Why bytes are not (yet) a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// More bytes are needed.
    Partial,
    /// A complete request: its head and body, and how many bytes it took.
    Complete { method: String, path: String, content_type: Option<String>, body: std::ops::Range<usize>, close: bool, used: usize },
    /// Not a request this server takes: the response to send before closing.
    Bad(Response),
}

/// Parses one request from the start of `buf`.
pub fn parse(buf: &[u8]) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Parse::Bad(Response::error(431, format!("request head over {MAX_HEAD} bytes: send a smaller request")))
        }
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parse::Bad(Response::error(431, format!("more than {MAX_HEADERS} headers: send fewer")))
        }
        Err(e) => return Parse::Bad(Response::error(400, format!("malformed HTTP request ({e}): send HTTP/1.1"))),
    };
    if head_len > MAX_HEAD {
        return Parse::Bad(Response::error(431, format!("request head over {MAX_HEAD} bytes: send a smaller request")));
    }
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Parse::Bad(Response::error(400, "malformed HTTP request line"));
    };
    let mut length: Option<usize> = None;
    let mut content_type = None;
    let mut close = version == 0;
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value).trim().to_string();
        if h.name.eq_ignore_ascii_case("content-length") {
            let Ok(n) = value.parse::<usize>() else {
                return Parse::Bad(Response::error(400, format!("Content-Length `{value}` is not a number")));
            };
            if length.is_some_and(|m| m != n) {
                return Parse::Bad(Response::error(400, "two different Content-Length headers"));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parse::Bad(Response::error(411, "chunked bodies are not taken: send Content-Length"));
        } else if h.name.eq_ignore_ascii_case("content-type") {
            content_type = Some(value);
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            close = v.contains("close") || (close && !v.contains("keep-alive"));
        }
    }
    let length = length.unwrap_or(0);
    if length > MAX_BODY {
        return Parse::Bad(Response::error(413, format!("a body of {length} bytes is over the {MAX_BODY}-byte limit")));
    }
    let Some(end) = head_len.checked_add(length).filter(|&e| e <= buf.len()) else {
        return Parse::Partial;
    };
    Parse::Complete {
        method: method.to_string(),
        path: path.to_string(),
        content_type,
        body: head_len..end,
        close,
        used: end,
    }
}

/// Writes `resp` and closes: for a client the server will not serve.
pub fn serve_one_response(stream: &UnixStream, resp: &Response) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = resp.write_to(&mut &*stream, true);
}

/// Serves requests on `stream` until the client closes it, goes silent
/// for [`IDLE_TIMEOUT`], sends something that is not a request, or
/// `handle` says the connection is the last (`true`: the server exits).
pub fn serve(stream: UnixStream, mut handle: impl FnMut(Request) -> (Response, bool)) {
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IDLE_TIMEOUT));
    let mut buf: Vec<u8> = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut chunk = vec![0u8; 16 << 10];
    loop {
        let (method, path, content_type, body, close, used) = match parse(&buf) {
            Parse::Complete { method, path, content_type, body, close, used } => {
                (method, path, content_type, body, close, used)
            }
            Parse::Bad(resp) => {
                let _ = resp.write_to(&mut &stream, true);
                return;
            }
            Parse::Partial => {
                match recv_with_fds(&stream, &mut chunk, &mut fds) {
                    Ok(0) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                        if !buf.is_empty() {
                            let _ = Response::error(408, "request incomplete after 10 s: send it whole")
                                .write_to(&mut &stream, true);
                        }
                        return;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
                if fds.len() > MAX_FDS {
                    let _ = Response::error(400, format!("more than {MAX_FDS} file descriptors in one request"))
                        .write_to(&mut &stream, true);
                    return;
                }
                continue;
            }
        };
        let req = Request {
            method,
            path,
            content_type,
            body: buf[body].to_vec(),
            fds: std::mem::take(&mut fds),
            close,
        };
        buf.drain(..used);
        let (resp, last) = handle(req);
        let close = close || last;
        if resp.write_to(&mut &stream, close).is_err() || close {
            return;
        }
    }
}

/// Reads what is there (blocking up to the socket's timeout), keeping
/// descriptors that come with it (close-on-exec).
fn recv_with_fds(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    const FD_SPACE: usize = MAX_FDS * std::mem::size_of::<libc::c_int>();
    // u64 elements: cmsg buffers must be aligned for `cmsghdr`.
    let mut cmsg = [0u64; (FD_SPACE + 64) / 8];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: an all-zero msghdr is valid (no name, no iovecs, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
    // SAFETY: `msg` points at `iov` (into `buf`) and `cmsg`, both live and
    // of the sizes given, for the duration of the call.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the CMSG_* walk stays inside `msg.msg_control` /
    // `msg_controllen` as recvmsg filled them.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` is a header inside the control buffer (see above).
        let (level, kind, len) = unsafe { ((*c).cmsg_level, (*c).cmsg_type, (*c).cmsg_len as usize) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is the header size; arithmetic only.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = len.saturating_sub(header) / std::mem::size_of::<libc::c_int>();
            // SAFETY: the data of an SCM_RIGHTS message is `count` ints.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<libc::c_int>();
            for i in 0..count {
                // SAFETY: `i < count` ints lie inside this message's data;
                // read_unaligned because cmsg data need not be aligned.
                let fd = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel installed `fd` in this process for us:
                // nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: as above, the walk stays inside the control buffer.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(b: &[u8]) -> (String, String, Vec<u8>, bool) {
        match parse(b) {
            Parse::Complete { method, path, body, close, .. } => (method, path, b[body].to_vec(), close),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_with_and_without_bodies() {
        let (m, p, b, close) = complete(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!((m.as_str(), p.as_str(), b.len(), close), ("GET", "/api/v1/vmm.ping", 0, false));
        let (_, _, b, _) = complete(b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}extra");
        assert_eq!(b, b"{}");
        assert!(complete(b"GET / HTTP/1.0\r\n\r\n").3, "HTTP/1.0 closes");
        assert!(complete(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").3);
    }

    #[test]
    fn status_lines_are_cloud_hypervisors() {
        let mut out = Vec::new();
        Response::error(409, "no").write_to(&mut out, false).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 409 \r\n"), "{text:?}");
        assert!(text.ends_with("Content-Type: application/json\r\nContent-Length: 7\r\n\r\n[\"no\"]\n"), "{text:?}");
        assert_eq!(Response::error(400, "a\nb").message().as_deref(), Some("a b"));
        let mut out = Vec::new();
        Response::no_content().write_to(&mut out, true).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "HTTP/1.1 204 \r\nServer: kickvm\r\nConnection: close\r\n\r\n");
    }

    #[test]
    fn partial_and_bad() {
        assert_eq!(parse(b"GET /api/v1/vmm.pi"), Parse::Partial);
        assert_eq!(parse(b"PUT / HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}"), Parse::Partial);
        let status = |b: &[u8]| match parse(b) {
            Parse::Bad(r) => r.status,
            other => panic!("{other:?}"),
        };
        assert_eq!(status(b"\x00\x01garbage\r\n\r\n"), 400);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n"), 413);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), 411);
        assert_eq!(status(&[b'a'; MAX_HEAD + 1]), 431);
        let mut long = b"GET /".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_HEAD + 1));
        assert_eq!(status(&long), 431);
    }
}
