//! The watch scenario (pollgate only): `--subscribers` clients watch one
//! resource of a legacy backend through a watch route while a writer
//! changes it `--rate` times a second through the gateway; or, with
//! `--direct`, the same clients poll the backend itself every `--interval`,
//! as such clients do without pollgate. Reports backend requests per change
//! (watch) or per second (direct), and how long a change takes to reach the
//! clients.
//!
//! The backend runs in this process on `--backend` (pollgate's bench config
//! points its `shop` upstream there): `GET /orders/1` answers the last
//! written body (no ETag: pollgate hashes it), `PUT /orders/1` stores one.

use crate::http::{request, Conn};
use crate::{now_ns, percentile, Args};
use bytes::{Buf, BytesMut};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The legacy backend's state.
#[derive(Default)]
struct Backend {
    body: Mutex<Vec<u8>>,
    gets: AtomicUsize,
}

/// Serves one backend connection: GET answers the body, PUT replaces it.
async fn backend_connection(mut tcp: TcpStream, state: Arc<Backend>) {
    let _ = tcp.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match tcp.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            match tcp.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
        let body = if head.starts_with("put ") {
            let new = buf[head_end..head_end + len].to_vec();
            *state.body.lock().unwrap() = new.clone();
            new
        } else {
            state.gets.fetch_add(1, Ordering::Relaxed);
            state.body.lock().unwrap().clone()
        };
        buf.advance(head_end + len);
        let mut answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(&body);
        if tcp.write_all(&answer).await.is_err() {
            return;
        }
    }
}

/// The write timestamp in a body `{"v":..,"t":<ns>}`.
fn written_at(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Value>(body).ok()?["t"].as_u64()
}

/// One client: watches through pollgate (`If-None-Match`), or polls the
/// backend every `interval` when `direct`. Returns the delay, in µs, from
/// each write to this client seeing it.
async fn client(
    args: Arc<Args>,
    direct: bool,
    ready: Arc<AtomicUsize>,
    until: Instant,
) -> Vec<u32> {
    let server = if direct { args.backend } else { args.sub[0] };
    let mut seen = Vec::new();
    let Ok(mut conn) = Conn::connect(server, None).await else {
        return seen;
    };
    let mut etag: Option<String> = None;
    // The write time of the version this client has (None before its first answer).
    let mut have: Option<u64> = None;
    let mut counted = false;
    // Direct pollers start spread over one interval.
    if direct {
        tokio::time::sleep(args.interval.mul_f64(fastrand::f64())).await;
    }
    while Instant::now() < until {
        let headers: Vec<(&str, &str)> =
            etag.iter().map(|e| ("If-None-Match", e.as_str())).collect();
        let req = request("GET", "/orders/1", &headers, b"");
        let exchange = conn.exchange(&req);
        if !counted {
            counted = true;
            ready.fetch_add(1, Ordering::Relaxed);
        }
        let answer = match tokio::time::timeout_at(until.into(), exchange).await {
            Ok(Ok(a)) => a,
            _ => break,
        };
        if answer.status == 200 {
            if let Some(t) = written_at(&answer.body).filter(|t| have.is_none_or(|h| *t > h)) {
                if have.is_some() {
                    seen.push((now_ns().saturating_sub(t) / 1000).min(u32::MAX as u64) as u32);
                }
                have = Some(t);
            }
            etag = answer.header("etag").map(str::to_string);
        }
        if direct {
            tokio::time::sleep(args.interval).await;
        }
    }
    seen
}

/// Runs the scenario and returns its JSON line.
pub async fn run(args: Arc<Args>, direct: bool) -> Value {
    let state = Arc::new(Backend::default());
    *state.body.lock().unwrap() = json!({"v": 0, "t": 0}).to_string().into_bytes();
    let listener = TcpListener::bind(args.backend)
        .await
        .expect("backend address");
    let backend = {
        let state = state.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(backend_connection(tcp, state.clone()));
            }
        })
    };
    let ready = Arc::new(AtomicUsize::new(0));
    let until = Instant::now() + args.settle + args.duration + Duration::from_secs(2);
    let clients: Vec<_> = (0..args.subscribers)
        .map(|_| tokio::spawn(client(args.clone(), direct, ready.clone(), until)))
        .collect();
    while ready.load(Ordering::Relaxed) < clients.len() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(args.settle).await;
    let gets_before = state.gets.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut writes = 0u64;
    let mut writer = Conn::connect(args.sub[0], None).await.expect("pollgate");
    let period = Duration::from_secs_f64(1.0 / args.rate.max(0.001));
    while started.elapsed() < args.duration {
        writes += 1;
        let body = json!({"v": writes, "t": now_ns()}).to_string();
        let req = request(
            "PUT",
            "/orders/1",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        if direct {
            *state.body.lock().unwrap() = body.into_bytes();
        } else if !writer.exchange(&req).await.is_ok_and(|a| a.status == 200) {
            writer = Conn::connect(args.sub[0], None).await.expect("pollgate");
        }
        tokio::time::sleep(period).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    // The last write's deliveries land within the tail.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let gets = state.gets.load(Ordering::Relaxed) - gets_before;
    let mut delays = Vec::new();
    for c in clients {
        delays.extend(c.await.unwrap_or_default());
    }
    backend.abort();
    delays.sort_unstable();
    let ms = |p: f64| percentile(&delays, p) as f64 / 1000.0;
    json!({
        "label": args.label,
        "server": args.server,
        "scenario": if direct { "watch-direct" } else { "watch" },
        "subscribers": args.subscribers,
        "writes": writes,
        "seconds": seconds,
        "backend_requests": gets,
        "backend_requests_per_change": gets as f64 / writes.max(1) as f64,
        "backend_requests_per_sec": gets as f64 / seconds,
        "changes_seen": delays.len(),
        "changes_expected": writes as usize * args.subscribers,
        "delay_ms": {"p50": ms(0.5), "p99": ms(0.99), "max": delays.last().copied().unwrap_or(0) as f64 / 1000.0},
    })
}
