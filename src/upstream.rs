//! Upstream pools and the buffered exchange used where pollgate must see a
//! whole answer before the client does (publish-through, header-directed
//! publish, subscriber authorization, watch fetches). The exchange skips
//! the upstream's 1xx answers and reads the final one.
//!
//! A [`Pool`] hands out its addresses round robin and skips one for
//! [`COOLDOWN`] after it failed to connect (passive health). Plain proxy
//! routes stream through Pingora's proxy with peers from the same pools.

use crate::config::UpstreamConfig;
use crate::metrics;
use bytes::{Bytes, BytesMut};
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::protocols::http::client::HttpSession;
use pingora::server::ShutdownWatch;
use pingora::{Error, ErrorType, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

/// How long an address that failed to connect is skipped.
pub const COOLDOWN: Duration = Duration::from_secs(10);

/// Headers that belong to one hop and are not forwarded (RFC 9110 §7.6.1;
/// `Proxy-Authorization` is this hop's credentials).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

/// One named upstream.
pub struct Pool {
    pub name: String,
    pub config: UpstreamConfig,
    next: AtomicUsize,
    /// Per address: skipped until this time (ms since [`EPOCH`]).
    down_until: Vec<AtomicU64>,
    /// Per address: whether its last health check failed.
    unhealthy: Vec<AtomicBool>,
}

impl Pool {
    fn new(name: &str, config: &UpstreamConfig) -> Pool {
        Pool {
            name: name.to_string(),
            down_until: config.addrs.iter().map(|_| AtomicU64::new(0)).collect(),
            unhealthy: config
                .addrs
                .iter()
                .map(|_| AtomicBool::new(false))
                .collect(),
            config: config.clone(),
            next: AtomicUsize::new(0),
        }
    }

    /// The next address to use: round robin over the healthy ones (or over
    /// all when none is healthy). Returns its index.
    pub fn pick(&self) -> usize {
        let n = self.config.addrs.len();
        let now = now_ms();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| self.down_until[i].load(Ordering::Relaxed) <= now)
            .unwrap_or(start % n)
    }

    /// Marks address `index` as failing for [`COOLDOWN`] (or longer, when
    /// its health check failed).
    pub fn mark_failed(&self, index: usize) {
        let until = now_ms() + COOLDOWN.as_millis() as u64;
        self.down_until[index].fetch_max(until, Ordering::Relaxed);
        tracing::warn!(upstream = %self.name, addr = %self.config.addrs[index], "upstream address failed; skipping it for {COOLDOWN:?}");
    }

    /// Connects to every address once (TCP, within `connect_timeout`). One
    /// that cannot be reached is skipped until a later check reaches it
    /// (unless no address is left: [`Pool::pick`] then tries them all);
    /// one that is reached is used again at once.
    pub async fn check(&self) {
        for (i, addr) in self.config.addrs.iter().enumerate() {
            let connect = tokio::net::TcpStream::connect(addr.as_str());
            let reached = matches!(
                tokio::time::timeout(self.config.connect_timeout, connect).await,
                Ok(Ok(_))
            );
            let was_unhealthy = self.unhealthy[i].swap(!reached, Ordering::Relaxed);
            if reached {
                self.down_until[i].store(0, Ordering::Relaxed);
                if was_unhealthy {
                    tracing::info!(upstream = %self.name, %addr, "upstream address passes its health check again");
                }
            } else {
                self.down_until[i].store(u64::MAX, Ordering::Relaxed);
                if !was_unhealthy {
                    tracing::warn!(upstream = %self.name, %addr, "upstream address failed its health check; skipping it until one passes");
                }
            }
        }
    }

    /// Number of addresses.
    pub fn len(&self) -> usize {
        self.config.addrs.len()
    }

    /// True when the pool has no address (never, once validated).
    pub fn is_empty(&self) -> bool {
        self.config.addrs.is_empty()
    }

    /// A Pingora peer for address `index`. The name is resolved here so
    /// that one that does not resolve is an error (502), not a panic.
    pub async fn peer(&self, index: usize) -> Result<HttpPeer> {
        let addr = &self.config.addrs[index];
        let resolved = tokio::net::lookup_host(addr.as_str())
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                Error::explain(
                    ErrorType::ConnectNoRoute,
                    format!("cannot resolve upstream address {addr}"),
                )
                .into_up()
            })?;
        let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
        let sni = self.config.sni.clone().unwrap_or_else(|| host.to_string());
        let mut peer = HttpPeer::new(resolved, self.config.tls, sni);
        peer.options.connection_timeout = Some(self.config.connect_timeout);
        peer.options.read_timeout = Some(self.config.read_timeout);
        Ok(peer)
    }
}

/// Counts one upstream exchange in the metrics.
pub fn observe(upstream: &str, status: Option<u16>, started: Instant) {
    let status = status.map_or("error".to_string(), |s| s.to_string());
    metrics::UPSTREAM_REQUESTS
        .with_label_values(&[upstream, &status])
        .inc();
    metrics::UPSTREAM_LATENCY
        .with_label_values(&[upstream])
        .observe(started.elapsed().as_secs_f64());
}

/// A whole upstream answer.
pub struct FullResponse {
    pub header: ResponseHeader,
    pub body: Bytes,
}

/// All upstreams of a config, and a connection pool for buffered exchanges.
pub struct Upstreams {
    pools: HashMap<String, Arc<Pool>>,
    connector: Connector,
}

impl Upstreams {
    /// The pools of `config`.
    pub fn new(config: &std::collections::BTreeMap<String, UpstreamConfig>) -> Upstreams {
        Upstreams {
            pools: config
                .iter()
                .map(|(n, c)| (n.clone(), Arc::new(Pool::new(n, c))))
                .collect(),
            connector: Connector::new(None),
        }
    }

    /// The pool named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.get(name)
    }

    /// Checks every pool's addresses at start and then every
    /// `health_check_interval` (pools with `0s` never), until `shutdown`.
    pub async fn check_health(&self, shutdown: &mut ShutdownWatch) {
        let mut checks: tokio::task::JoinSet<()> = self
            .pools
            .values()
            .filter(|pool| !pool.config.health_check_interval.is_zero())
            .map(|pool| {
                let pool = pool.clone();
                async move {
                    loop {
                        pool.check().await;
                        tokio::time::sleep(pool.config.health_check_interval).await;
                    }
                }
            })
            .collect();
        if checks.is_empty() {
            return;
        }
        let _ = shutdown.changed().await;
        checks.abort_all();
    }

    /// Sends `request` with `body` to `pool` and reads the whole answer (at
    /// most `max_answer` bytes). Tries the next address when one cannot be
    /// connected. Errors carry Pingora's types (connect → 502, timeout → 504).
    pub async fn exchange(
        &self,
        pool: &Pool,
        request: &RequestHeader,
        body: Bytes,
        max_answer: u64,
    ) -> Result<FullResponse> {
        let started = Instant::now();
        let mut last_error = None;
        // One extra attempt: a pooled connection the upstream closed while
        // idle fails at once and is retried on a fresh one.
        let mut stale_retry = true;
        for _ in 0..pool.len() + 1 {
            let index = pool.pick();
            let peer = pool.peer(index).await?;
            let (mut session, reused) = match self.connector.get_http_session(&peer).await {
                Ok(s) => s,
                Err(e) => {
                    pool.mark_failed(index);
                    last_error = Some(e);
                    continue;
                }
            };
            session.set_read_timeout(Some(pool.config.read_timeout));
            session.set_write_timeout(Some(pool.config.read_timeout));
            let result = async {
                session
                    .write_request_header(Box::new(request.clone()))
                    .await?;
                if !body.is_empty() {
                    session.write_request_body(body.clone(), true).await?;
                }
                session.finish_request_body().await?;
                read_final_header(&mut session).await?;
                let mut answer = BytesMut::new();
                while let Some(chunk) = session.read_response_body().await? {
                    answer.extend_from_slice(&chunk);
                    if answer.len() as u64 > max_answer {
                        return Error::e_explain(
                            ErrorType::InvalidHTTPHeader,
                            "upstream answer is larger than limits.max_body",
                        );
                    }
                }
                let header = session.response_header().cloned().ok_or_else(|| {
                    Error::explain(ErrorType::InvalidHTTPHeader, "no response header")
                })?;
                Ok(FullResponse {
                    header,
                    body: answer.freeze(),
                })
            }
            .await;
            return match result {
                Ok(answer) => {
                    observe(&pool.name, Some(answer.header.status.as_u16()), started);
                    let reusable = session.response_done();
                    if reusable {
                        self.connector
                            .release_http_session(session, &peer, Some(Duration::from_secs(60)))
                            .await;
                    }
                    Ok(answer)
                }
                Err(e) if reused && stale_retry && is_stale(&e) => {
                    stale_retry = false;
                    last_error = Some(e);
                    continue;
                }
                Err(e) => {
                    observe(&pool.name, None, started);
                    Err(e.into_up())
                }
            };
        }
        observe(&pool.name, None, started);
        Err(last_error
            .unwrap_or_else(|| Error::explain(ErrorType::ConnectError, "no upstream address"))
            .into_up())
    }
}

/// Reads the answer's header until it is the final one: 1xx answers
/// (`100 Continue`, `103 Early Hints`) come before it and are skipped, as
/// the buffered routes pass only the final answer to the client (reading
/// the body after a 1xx header would panic inside Pingora's body reader).
/// A `101` is an error: nothing here asked to switch protocols. Returns
/// once the final header is read (the session's `response_header`).
async fn read_final_header(session: &mut HttpSession) -> Result<()> {
    loop {
        session.read_response_header().await?;
        let status = session.response_header().map(|h| h.status.as_u16());
        match status {
            Some(101) => {
                return Error::e_explain(
                    ErrorType::InvalidHTTPHeader,
                    "upstream answered 101 Switching Protocols unasked",
                )
            }
            Some(100..=199) => continue,
            _ => return Ok(()),
        }
    }
}

/// True for the errors of a kept-alive connection the peer had closed.
fn is_stale(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectionClosed | ErrorType::WriteError | ErrorType::ReadError
    )
}

/// True for headers that are not forwarded hop to hop.
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// The headers `headers` names in its `Connection` fields: hop-by-hop too,
/// whatever their names (RFC 9110 §7.6.1).
pub fn connection_named(headers: &http::HeaderMap) -> Vec<http::HeaderName> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|t| http::HeaderName::from_bytes(t.trim_ascii()).ok())
        .collect()
}

/// Removes from `request` every hop-by-hop header, those its `Connection`
/// names included.
pub fn strip_hop_by_hop(request: &mut RequestHeader) {
    for name in connection_named(&request.headers) {
        request.remove_header(&name);
    }
    for name in HOP_BY_HOP {
        request.remove_header(*name);
    }
}

/// The client's connection as `X-Forwarded-For` and `-Proto` describe it.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// The client's IP address.
    pub ip: Option<String>,
    /// True when the client connected over TLS.
    pub tls: bool,
}

impl Peer {
    /// The client of `session`.
    pub fn of(session: &pingora::protocols::http::ServerSession) -> Peer {
        Peer {
            ip: session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip().to_string()),
            tls: session.digest().is_some_and(|d| d.ssl_digest.is_some()),
        }
    }
}

/// Makes `request`, going upstream for the `client`'s request, say where
/// it came from, as a proxy does: `X-Forwarded-For` with every value the
/// client sent, in order, and the peer appended; `X-Forwarded-Proto`;
/// `X-Forwarded-Host` and a `Host` (the client's, or the authority of an
/// HTTP/2 or absolute-form target); and its `Cookie` fields (HTTP/2 cookie
/// crumbs) joined into one (RFC 9113 §8.2.3).
pub fn add_forwarded(
    request: &mut RequestHeader,
    client: &RequestHeader,
    peer: &Peer,
) -> Result<()> {
    let mut chain = Vec::new();
    for prior in client.headers.get_all("X-Forwarded-For") {
        if !chain.is_empty() {
            chain.extend_from_slice(b", ");
        }
        chain.extend_from_slice(prior.as_bytes());
    }
    if let Some(ip) = &peer.ip {
        if !chain.is_empty() {
            chain.extend_from_slice(b", ");
        }
        chain.extend_from_slice(ip.as_bytes());
    }
    request.remove_header("X-Forwarded-For");
    if !chain.is_empty() {
        request.insert_header("X-Forwarded-For", header_value(chain)?)?;
    }
    request.insert_header("X-Forwarded-Proto", if peer.tls { "https" } else { "http" })?;
    let host = client.headers.get(http::header::HOST).cloned().or_else(|| {
        let authority = client.uri.authority()?.as_str();
        http::HeaderValue::from_str(authority).ok()
    });
    if let Some(host) = host {
        if request.headers.get(http::header::HOST).is_none() {
            request.insert_header(http::header::HOST, host.clone())?;
        }
        request.insert_header("X-Forwarded-Host", host)?;
    }
    if request
        .headers
        .get_all(http::header::COOKIE)
        .iter()
        .nth(1)
        .is_some()
    {
        let joined = joined_cookie(&request.headers);
        request.remove_header(&http::header::COOKIE);
        if let Some(joined) = joined {
            request.insert_header(http::header::COOKIE, header_value(joined.to_vec())?)?;
        }
    }
    Ok(())
}

/// Every `Cookie` field of `headers` as one value, the fields joined with
/// `; ` (None without any).
pub fn joined_cookie(headers: &http::HeaderMap) -> Option<Bytes> {
    let mut fields = headers.get_all(http::header::COOKIE).iter();
    let first = fields.next()?;
    let mut joined = first.as_bytes().to_vec();
    for more in fields {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(more.as_bytes());
    }
    Some(Bytes::from(joined))
}

fn header_value(bytes: Vec<u8>) -> Result<http::HeaderValue> {
    http::HeaderValue::from_maybe_shared(Bytes::from(bytes))
        .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "bad header value"))
}

/// The client's request re-sent upstream as `method` to `path_and_query`
/// (origin-form): same headers, without hop-by-hop ones (those the
/// client's `Connection` names included), framing (`Content-Length`,
/// `Expect`, which the caller sets) and with `X-Forwarded-*`.
pub fn forwarded_copy(
    client: &RequestHeader,
    method: http::Method,
    path_and_query: &str,
    peer: &Peer,
) -> Result<RequestHeader> {
    let mut request = RequestHeader::build(method, path_and_query.as_bytes(), None)?;
    let named = connection_named(&client.headers);
    for (name, value) in client.headers.iter() {
        let n = name.as_str();
        if is_hop_by_hop(n) || n == "content-length" || n == "expect" || named.contains(name) {
            continue;
        }
        request.append_header(name.clone(), value.clone())?;
    }
    add_forwarded(&mut request, client, peer)?;
    Ok(request)
}

/// The upstream's answer header as sent to the client (without hop-by-hop
/// headers, those its `Connection` names included, and framing, which
/// pollgate sets).
pub fn client_header(upstream: &ResponseHeader) -> Result<ResponseHeader> {
    let mut h = ResponseHeader::build(upstream.status, Some(upstream.headers.len()))?;
    let named = connection_named(&upstream.headers);
    for (name, value) in upstream.headers.iter() {
        let n = name.as_str();
        if is_hop_by_hop(n) || n == "content-length" || named.contains(name) {
            continue;
        }
        h.append_header(name.clone(), value.clone())?;
    }
    Ok(h)
}
