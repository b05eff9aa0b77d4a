//! A small real HTTP backend for proxy tests (hyper), recording every
//! request it receives. Behaviour by path:
//! - `/status/<code>` answers `<code>` with a JSON body;
//! - `/slow` answers after 3 s;
//! - `/publish-to/<a,b>` answers 200 with `Pollgate-Publish: <a,b>`;
//! - `/healthz` answers the status set with [`Backend::set_health`] (200
//!   at first);
//! - a path containing `/events` is an authorization check: 200 when
//!   `Authorization: Bearer good`, `access_token=good` in the query, a
//!   cookie `session=V` (in any `Cookie` field) or `X-Api-Key: good`, else
//!   401 with `WWW-Authenticate`;
//! - anything else echoes what it received as JSON (status 200, or 201 for
//!   POST), with `X-Backend: <port>` on every answer.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

/// One request as the backend saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path_and_query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Seen {
    /// Every value of header `name`, one per field received.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A running backend.
pub struct Backend {
    pub port: u16,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// The status of `/healthz`.
    health: Arc<AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    /// Starts a backend on a free port.
    pub async fn start() -> Backend {
        Backend::start_on(0).await
    }

    /// Starts a backend on `port` of 127.0.0.1 (0: a free one).
    pub async fn start_on(port: u16) -> Backend {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let health = Arc::new(AtomicU16::new(200));
        let (record, status) = (seen.clone(), health.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (record, status) = (record.clone(), status.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        handle(req, port, record.clone(), status.load(Ordering::Relaxed))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Backend {
            port,
            seen,
            health,
            task,
        }
    }

    /// Makes `/healthz` answer `status`.
    pub fn set_health(&self, status: u16) {
        self.health.store(status, Ordering::Relaxed);
    }

    /// How many requests for `path` (without query) it received so far.
    pub fn count(&self, path: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.path_and_query.split('?').next() == Some(path))
            .count()
    }

    /// `127.0.0.1:<port>`
    pub fn addr(&self) -> String {
        SocketAddr::from(([127, 0, 0, 1], self.port)).to_string()
    }

    /// Requests received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn handle(
    req: Request<Incoming>,
    port: u16,
    record: Arc<Mutex<Vec<Seen>>>,
    health: u16,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let method = req.method().to_string();
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or("/".into(), |p| p.to_string());
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = req.into_body().collect().await?.to_bytes().to_vec();
    let seen = Seen {
        method: method.clone(),
        path_and_query: path_and_query.clone(),
        headers,
        body,
    };
    record.lock().unwrap().push(seen.clone());
    let path = path_and_query.split('?').next().unwrap_or("/").to_string();
    let mut builder = Response::builder().header("X-Backend", port.to_string());
    let (status, content_type, body): (u16, &str, Vec<u8>) = if let Some(code) =
        path.strip_prefix("/status/")
    {
        let code: u16 = code.parse().unwrap_or(500);
        (
            code,
            "application/json",
            format!("{{\"status\":{code}}}").into_bytes(),
        )
    } else if path == "/healthz" {
        (health, "text/plain", b"health".to_vec())
    } else if path == "/slow" {
        tokio::time::sleep(Duration::from_secs(3)).await;
        (200, "text/plain", b"late".to_vec())
    } else if let Some(list) = path.strip_prefix("/publish-to/") {
        builder = builder.header("Pollgate-Publish", list.replace("%20", " "));
        (200, "application/json", b"{\"via\":\"header\"}".to_vec())
    } else if path.contains("/events") {
        let query_token = path_and_query
            .split_once('?')
            .is_some_and(|(_, q)| q.split('&').any(|p| p == "access_token=good"));
        let session_cookie = seen
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("cookie"))
            .flat_map(|(_, v)| v.split(';'))
            .any(|c| c.trim() == "session=V");
        if seen.header("Authorization") == Some("Bearer good")
            || query_token
            || session_cookie
            || seen.header("X-Api-Key") == Some("good")
        {
            (200, "text/plain", b"ok".to_vec())
        } else {
            builder = builder.header("WWW-Authenticate", "Bearer realm=\"chat\"");
            (
                401,
                "application/json",
                b"{\"error\":\"who are you?\"}".to_vec(),
            )
        }
    } else {
        let echo = serde_json::json!({
            "method": seen.method,
            "path": seen.path_and_query,
            "body_len": seen.body.len(),
            // Small bodies only, so that echoing stays under limits.
            "body": if seen.body.len() <= 4096 { String::from_utf8_lossy(&seen.body).into_owned() } else { String::new() },
        });
        let status = if method == "POST" { 201 } else { 200 };
        (
            status,
            "application/json",
            serde_json::to_vec(&echo).unwrap(),
        )
    };
    let body = if method == "HEAD" { Vec::new() } else { body };
    Ok(builder
        .status(status)
        .header("Content-Type", content_type)
        .header("X-Custom", "kept")
        .body(Full::new(Bytes::from(body)))
        .unwrap())
}
