//! A backend on a raw socket that records every byte of each request head
//! it receives (nothing parsed for it, nothing normalized), for tests of
//! exactly what pollgate sends upstream. Every answer carries hop-by-hop
//! headers of the backend's own hop (`Connection: X-Hop`, `X-Hop: 1`,
//! `Keep-Alive: timeout=5`), which must not reach a client. By path:
//! - containing `/hdr/`: `Pollgate-Publish: hdr` (header-directed publish);
//! - containing `/gzip-if-asked`: gzip when `Accept-Encoding` allows it;
//! - containing `/gzip-always`: gzip whatever was asked;
//! - anything else: `200`, `text/plain`, the body `meant`, an `ETag`.
#![allow(dead_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The body every answer means.
pub const MEANT: &str = "meant";

/// One request as it arrived: the head's bytes and the body.
#[derive(Clone, Debug)]
pub struct RawSeen {
    pub head: String,
    pub body: Vec<u8>,
}

impl RawSeen {
    /// The request line.
    pub fn line(&self) -> &str {
        self.head.split("\r\n").next().unwrap_or_default()
    }

    /// Every value of header `name`, one per field line.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
            .collect()
    }
}

/// A running raw backend.
pub struct RawBackend {
    pub port: u16,
    seen: Arc<Mutex<Vec<RawSeen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawBackend {
    /// Starts one on a free port of 127.0.0.1.
    pub async fn start() -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Arc<Mutex<Vec<RawSeen>>> = Arc::default();
        let record = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let Some(seen) = read_request(&mut stream, &mut buf).await else {
                            return;
                        };
                        let answer = answer(&seen);
                        record.lock().unwrap().push(seen);
                        if stream.write_all(&answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        RawBackend { port, seen, task }
    }

    /// `127.0.0.1:<port>`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The requests received so far.
    pub fn seen(&self) -> Vec<RawSeen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Reads one request (head, then a `Content-Length` body) from `stream`,
/// `buf` holding what was read past the previous one.
async fn read_request(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<RawSeen> {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut seen = RawSeen {
        head,
        body: Vec::new(),
    };
    buf.drain(..end);
    if seen
        .all("transfer-encoding")
        .iter()
        .any(|v| v.contains("chunked"))
    {
        // Chunk after chunk (extensions ignored), then trailer lines.
        loop {
            let line = read_line(stream, buf).await?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16).ok()?;
            if size == 0 {
                while !read_line(stream, buf).await?.is_empty() {}
                return Some(seen);
            }
            fill(stream, buf, size + 2).await?;
            seen.body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
    }
    let len: usize = seen
        .all("content-length")
        .first()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    fill(stream, buf, len).await?;
    seen.body = buf.drain(..len).collect();
    Some(seen)
}

/// Reads from `stream` until `buf` holds `len` bytes (None: it closed).
async fn fill(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, len: usize) -> Option<()> {
    while buf.len() < len {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(())
}

/// The next line of `stream` (without its CRLF), taken from `buf`.
async fn read_line(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..i]).into_owned();
            buf.drain(..i + 2);
            return Some(line);
        }
        let have = buf.len();
        fill(stream, buf, have + 1).await?;
    }
}

/// `text` gzipped.
pub fn gzip(text: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(text).unwrap();
    e.finish().unwrap()
}

fn answer(seen: &RawSeen) -> Vec<u8> {
    let target = seen.line().split(' ').nth(1).unwrap_or("/");
    let gzip_allowed = seen
        .all("accept-encoding")
        .iter()
        .any(|v| v.split(',').any(|c| c.trim().starts_with("gzip")));
    let gzipped =
        target.contains("/gzip-always") || (target.contains("/gzip-if-asked") && gzip_allowed);
    let body = if gzipped {
        gzip(MEANT.as_bytes())
    } else {
        MEANT.as_bytes().to_vec()
    };
    let mut head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nETag: \"v1\"\r\n",
        body.len()
    );
    if gzipped {
        head.push_str("Content-Encoding: gzip\r\n");
    }
    if target.contains("/hdr/") {
        head.push_str("Pollgate-Publish: hdr\r\n");
    }
    head.push_str("\r\n");
    let mut whole = head.into_bytes();
    whole.extend_from_slice(&body);
    whole
}
