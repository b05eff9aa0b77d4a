//! A small legacy REST service that knows nothing of pollgate (hyper): an
//! order store. `GET /orders/<id>` answers the order as JSON (404 when
//! unknown), with `ETag: "v<version>"` when started `with_etags`; `PUT`
//! replaces it, `DELETE` removes it. It counts the GETs it serves and can
//! be told to fail them with 500, to slow them down, or to require a
//! bearer token.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;

/// The service's state.
#[derive(Default)]
pub struct Store {
    orders: Mutex<HashMap<String, (u64, String)>>,
    /// GETs served.
    pub gets: AtomicUsize,
    /// GETs answer 500 while set.
    pub failing: AtomicBool,
    /// Milliseconds each GET takes.
    pub delay_ms: AtomicU64,
    /// When set, GETs without `Authorization: Bearer <it>` answer 401.
    pub token: Mutex<Option<String>>,
    etags: bool,
}

/// A running legacy service.
pub struct Legacy {
    pub port: u16,
    pub store: Arc<Store>,
    task: tokio::task::JoinHandle<()>,
}

/// Dropping it stops the service and closes its connections.
impl Drop for Legacy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Legacy {
    /// Starts the service on a free port; `with_etags` makes it send ETags.
    pub async fn start(with_etags: bool) -> Legacy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let store = Arc::new(Store {
            etags: with_etags,
            ..Store::default()
        });
        let state = store.clone();
        let task = tokio::spawn(async move {
            // Owned here, so that stopping the service closes its connections.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                while connections.try_join_next().is_some() {}
                let state = state.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(req, state.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Legacy { port, store, task }
    }

    /// GETs served so far.
    pub fn gets(&self) -> usize {
        self.store.gets.load(Ordering::SeqCst)
    }

    /// Sets order `id` directly (as another writer of the database would).
    pub fn set(&self, id: &str, body: &str) {
        let mut orders = self.store.orders.lock().unwrap();
        let version = orders.get(id).map_or(1, |(v, _)| v + 1);
        orders.insert(id.to_string(), (version, body.to_string()));
    }
}

async fn handle(
    req: Request<Incoming>,
    store: Arc<Store>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let method = req.method().clone();
    let id = req
        .uri()
        .path()
        .strip_prefix("/orders/")
        .unwrap_or("")
        .to_string();
    let auth = req
        .headers()
        .get("Authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = req.into_body().collect().await?.to_bytes();
    let reply = |status: u16, body: String| {
        Response::builder()
            .status(status)
            .header("Content-Type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    let delay = store.delay_ms.load(Ordering::SeqCst);
    if method == "GET" && delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    let mut orders = store.orders.lock().unwrap();
    Ok(match method.as_str() {
        "GET" => {
            store.gets.fetch_add(1, Ordering::SeqCst);
            if store.failing.load(Ordering::SeqCst) {
                return Ok(reply(500, "{\"error\":\"database down\"}".into()));
            }
            if let Some(token) = store.token.lock().unwrap().as_deref() {
                if auth.as_deref() != Some(&format!("Bearer {token}")) {
                    return Ok(reply(401, "{\"error\":\"who are you\"}".into()));
                }
            }
            match orders.get(&id) {
                Some((version, order)) => {
                    let mut r = reply(200, order.clone());
                    if store.etags {
                        let etag = format!("\"v{version}\"").parse().unwrap();
                        r.headers_mut().insert("ETag", etag);
                    }
                    r
                }
                None => reply(404, "{\"error\":\"no such order\"}".into()),
            }
        }
        "PUT" => {
            let version = orders.get(&id).map_or(1, |(v, _)| v + 1);
            let text = String::from_utf8_lossy(&body).into_owned();
            orders.insert(id, (version, text.clone()));
            reply(200, text)
        }
        "DELETE" => {
            orders.remove(&id);
            reply(204, String::new())
        }
        _ => reply(405, "{}".into()),
    })
}
