//! Presence tests' real HTTP peers (hyper): a webhook receiver that checks
//! each request's signature and records its event, and can be taken down
//! and brought back on its port; and an authorize upstream that names the
//! subscriber from the client's `X-User` header.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// One request the receiver got: its event, and whether its signature was
/// right.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub event: serde_json::Value,
    pub signed: bool,
}

/// A webhook receiver on a port of its own.
pub struct Receiver {
    pub port: u16,
    secret: String,
    pub got: Arc<Mutex<Vec<Delivery>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `sha256=<hex HMAC-SHA256>` of `body`, computed here independently
/// of pollgate's code (RFC 2104 over SHA-256 from the `sha2` crate).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut key = [0u8; 64];
    if secret.len() > 64 {
        key[..32].copy_from_slice(&Sha256::digest(secret));
    } else {
        key[..secret.len()].copy_from_slice(secret);
    }
    let pad = |b: u8| key.iter().map(|k| k ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(body)
        .finalize();
    let outer = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    let hex: String = outer.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

impl Receiver {
    /// A receiver checking signatures with `secret`.
    pub async fn start(secret: &str) -> Receiver {
        let mut r = Receiver {
            port: 0,
            secret: secret.to_string(),
            got: Arc::default(),
            task: None,
        };
        r.up().await;
        r
    }

    /// Listens (again, on the same port once it had one).
    pub async fn up(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        self.port = listener.local_addr().unwrap().port();
        let (got, secret) = (self.got.clone(), self.secret.clone());
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (got, secret) = (got.clone(), secret.clone());
                conns.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        record(req, got.clone(), secret.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }));
    }

    /// Stops listening and closes every connection.
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// `127.0.0.1:<port>`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The events received so far, in arrival order.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let got = self.got.lock().unwrap();
        assert!(got.iter().all(|d| d.signed), "a bad signature: {got:?}");
        got.iter().map(|d| d.event.clone()).collect()
    }

    /// Waits until `done` holds for the events received, at most `limit`;
    /// returns them.
    pub async fn wait_for(
        &self,
        limit: Duration,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + limit;
        loop {
            let events = self.events();
            if done(&events) {
                return events;
            }
            assert!(Instant::now() < deadline, "events so far: {events:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn record(
    req: Request<Incoming>,
    got: Arc<Mutex<Vec<Delivery>>>,
    secret: String,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let signature = req
        .headers()
        .get("pollgate-signature")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let body = req.into_body().collect().await?.to_bytes();
    let signed = signature.as_deref() == Some(sign(secret.as_bytes(), &body).as_str());
    let event = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    got.lock().unwrap().push(Delivery { event, signed });
    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
}

/// An authorize upstream: allows every poll, naming the subscriber from
/// the client's `X-User` (none without it; `X-User: !bad` names one that
/// is not an identity).
pub struct Identities {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Identities {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Identities {
    pub async fn start() -> Identities {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let mut answer = Response::builder().status(200);
                        match req.headers().get("x-user").map(|v| v.as_bytes()) {
                            Some(b"!bad") => answer = answer.header("Pollgate-Subscriber", "a\tb"),
                            Some(user) => answer = answer.header("Pollgate-Subscriber", user),
                            None => {}
                        }
                        Ok::<_, hyper::Error>(answer.body(Full::new(Bytes::new())).unwrap())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Identities { port, task }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}
