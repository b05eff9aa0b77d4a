//! Upstream pools and the buffered exchange used where pollgate must see a
//! whole answer before the client does (publish-through, header-directed
//! publish, subscriber authorization, watch fetches). The exchange skips
//! the upstream's 1xx answers and reads the final one.
//!
//! A [`Pool`] hands out its addresses round robin over those that pass
//! their health check (pingora-load-balancing's `LoadBalancer<RoundRobin>`,
//! its TCP or HTTP checks), and skips one for [`COOLDOWN`] after it failed
//! to connect (passive health). Plain proxy routes stream through Pingora's
//! proxy with peers from the same pools.

use crate::config::{HealthCheckConfig, UpstreamConfig};
use crate::metrics;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::l4::socket::SocketAddr as BackendAddr;
use pingora::server::ShutdownWatch;
use pingora::{Error, ErrorType, Result};
use pingora_load_balancing::discovery::Static;
use pingora_load_balancing::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora_load_balancing::selection::RoundRobin;
use pingora_load_balancing::{Backend, Backends, Extensions, LoadBalancer};
use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

/// How long an address that failed to connect is skipped.
pub const COOLDOWN: Duration = Duration::from_secs(10);

/// Rounds of the round robin tried for a usable address before any is
/// taken: each step takes the next turn, so one round reaches every address
/// when no other request takes turns meanwhile; the others leave room for
/// those that do.
const ROUNDS: usize = 4;

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
    /// The round robin, and each address's health as the checks found it.
    balancer: LoadBalancer<RoundRobin>,
    /// Per address: skipped until this time (ms since [`EPOCH`]), after a
    /// request failed to connect (passive health).
    // Hand-written: pingora-load-balancing has no passive health (nothing to report a request's failure to).
    down_until: Arc<[AtomicU64]>,
}

/// The position in `addrs` of the address a balancer [`Backend`] stands for
/// (in its `ext`).
#[derive(Clone, Copy)]
struct Entry(usize);

/// The balancer's [`Backend`] for entry `index` of `addrs`. The balancer
/// knows backends by socket address, but an entry may be a name, resolved
/// on every request and every check, and two entries may resolve alike: so
/// its `addr` only tells the entries apart (the index as an IPv4 address,
/// port 0: sorted in the order of `addrs`), and the checks resolve the
/// entry itself.
fn entry_backend(index: usize) -> Backend {
    let mut ext = Extensions::new();
    ext.insert(Entry(index));
    Backend {
        addr: BackendAddr::Inet(SocketAddr::from((Ipv4Addr::from(index as u32), 0))),
        weight: 1,
        ext,
    }
}

/// The entry of `addrs` that `backend` stands for.
fn entry(backend: &Backend) -> usize {
    backend.ext.get::<Entry>().map_or(0, |e| e.0)
}

/// The first address `addr` (`host:port`) resolves to.
async fn resolve(addr: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(addr)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            Error::explain(
                ErrorType::ConnectNoRoute,
                format!("cannot resolve upstream address {addr}"),
            )
        })
}

/// A Pingora peer for entry `index` of `config.addrs`, resolved to
/// `resolved`: TLS and its server name (`sni`, or the entry's host), and
/// the timeouts.
fn peer_at(config: &UpstreamConfig, index: usize, resolved: SocketAddr) -> HttpPeer {
    let addr = &config.addrs[index];
    let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
    let sni = config.sni.clone().unwrap_or_else(|| host.to_string());
    let mut peer = HttpPeer::new(resolved, config.tls, sni);
    peer.options.connection_timeout = Some(config.connect_timeout);
    peer.options.read_timeout = Some(config.read_timeout);
    peer
}

impl Pool {
    fn new(name: &str, config: &UpstreamConfig) -> Pool {
        let down_until: Arc<[AtomicU64]> = config.addrs.iter().map(|_| AtomicU64::new(0)).collect();
        let entries: BTreeSet<Backend> = (0..config.addrs.len()).map(entry_backend).collect();
        let mut backends = Backends::new(Static::new(entries));
        backends.set_health_check(Box::new(AddressCheck::new(
            name,
            config,
            down_until.clone(),
        )));
        let balancer = LoadBalancer::from_backends(backends);
        // A static discovery answers at once: this fills the round robin.
        let filled = balancer.update().now_or_never();
        debug_assert!(matches!(filled, Some(Ok(()))));
        Pool {
            name: name.to_string(),
            config: config.clone(),
            balancer,
            down_until,
        }
    }

    /// The next address to use: round robin over those that passed their
    /// last health check and are not set aside by [`Pool::mark_failed`] (or
    /// over all when none is). Returns its index.
    pub fn pick(&self) -> usize {
        let now = now_ms();
        let usable = |b: &Backend, healthy: bool| {
            healthy && self.down_until[entry(b)].load(Ordering::Relaxed) <= now
        };
        self.balancer
            .select_with(b"", ROUNDS * self.len(), usable)
            .or_else(|| self.balancer.select_with(b"", 1, |_, _| true))
            .map_or(0, |b| entry(&b))
    }

    /// Marks address `index` as failing for [`COOLDOWN`] (or until its
    /// health check passes, whichever is sooner).
    pub fn mark_failed(&self, index: usize) {
        let until = now_ms() + COOLDOWN.as_millis() as u64;
        self.down_until[index].fetch_max(until, Ordering::Relaxed);
        tracing::warn!(upstream = %self.name, addr = %self.config.addrs[index], "upstream address failed; skipping it for {COOLDOWN:?}");
    }

    /// Checks every address once, all at once ([`AddressCheck`]). One that
    /// fails is skipped until a later check passes (unless no address is
    /// left: [`Pool::pick`] then takes them all); one that passes is used
    /// again at once.
    pub async fn check(&self) {
        self.balancer.backends().run_health_check(true).await;
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
        let resolved = resolve(&self.config.addrs[index])
            .await
            .map_err(|e| e.into_up())?;
        Ok(peer_at(&self.config, index, resolved))
    }
}

/// The health check of a pool's addresses that the balancer runs: for the
/// entry a backend stands for, the name resolved (within
/// `connect_timeout`), then pingora-load-balancing's check of that address:
/// a TCP connect (within `connect_timeout`; no TLS handshake), or with
/// `health_check.path` a GET of it over the upstream's TLS, with its server
/// name, that passes on a 2xx. Logs each change of an address's health.
struct AddressCheck {
    upstream: String,
    addrs: Vec<String>,
    connect_timeout: Duration,
    /// Per address: its check (an HTTP check has the address's server name).
    checks: Vec<Box<dyn HealthCheck + Send + Sync>>,
    /// The pool's passive health: a check that passes ends a cooldown.
    down_until: Arc<[AtomicU64]>,
}

impl AddressCheck {
    fn new(upstream: &str, config: &UpstreamConfig, down_until: Arc<[AtomicU64]>) -> AddressCheck {
        let HealthCheckConfig { path, .. } = config.health_check();
        let checks = (0..config.addrs.len())
            .map(|index| match &path {
                Some(path) => http_check(config, index, path),
                None => {
                    let mut tcp = TcpHealthCheck::new();
                    tcp.peer_template.options.connection_timeout = Some(config.connect_timeout);
                    tcp as Box<dyn HealthCheck + Send + Sync>
                }
            })
            .collect();
        AddressCheck {
            upstream: upstream.to_string(),
            addrs: config.addrs.clone(),
            connect_timeout: config.connect_timeout,
            checks,
            down_until,
        }
    }
}

/// The HTTP check of entry `index`: `GET path` with `Host` the upstream's
/// `sni` (when not empty) or the entry as written, on a new connection made
/// as a request's ([`peer_at`]: TLS, server name, timeouts; writes within
/// `read_timeout`); passes on a 2xx.
fn http_check(
    config: &UpstreamConfig,
    index: usize,
    path: &str,
) -> Box<dyn HealthCheck + Send + Sync> {
    let host = match config.sni.as_deref() {
        Some(sni) if !sni.is_empty() => sni,
        _ => config.addrs[index].as_str(),
    };
    let mut check = HttpHealthCheck::new(host, config.tls);
    check.peer_template = peer_at(config, index, SocketAddr::from(([0, 0, 0, 0], 0)));
    check.peer_template.options.write_timeout = Some(config.read_timeout);
    // The path was checked by `Config::validate`.
    if let Ok(mut request) = RequestHeader::build("GET", path.as_bytes(), None) {
        let _ = request.insert_header(http::header::HOST, host);
        check.req = request;
    }
    check.validator = Some(Box::new(|answer: &ResponseHeader| {
        if answer.status.is_success() {
            Ok(())
        } else {
            Error::e_explain(
                ErrorType::CustomCode("health check answer", answer.status.as_u16()),
                format!("health check answered {}", answer.status),
            )
        }
    }));
    Box::new(check)
}

#[async_trait]
impl HealthCheck for AddressCheck {
    async fn check(&self, target: &Backend) -> Result<()> {
        let index = entry(target);
        let addr = &self.addrs[index];
        let resolved = tokio::time::timeout(self.connect_timeout, resolve(addr))
            .await
            .map_err(|_| {
                Error::explain(
                    ErrorType::ConnectTimedout,
                    format!("resolving {addr} took longer than connect_timeout"),
                )
            })??;
        let probe = Backend {
            addr: BackendAddr::Inet(resolved),
            weight: 1,
            ext: Extensions::new(),
        };
        self.checks[index].check(&probe).await?;
        self.down_until[index].store(0, Ordering::Relaxed);
        Ok(())
    }

    async fn health_status_change(&self, target: &Backend, healthy: bool) {
        let addr = &self.addrs[entry(target)];
        if healthy {
            tracing::info!(upstream = %self.upstream, %addr, "upstream address passes its health check again");
        } else {
            tracing::warn!(upstream = %self.upstream, %addr, "upstream address failed its health check; skipping it until one passes");
        }
    }

    fn backend_summary(&self, target: &Backend) -> String {
        format!(
            "upstream {} address {}",
            self.upstream,
            self.addrs[entry(target)]
        )
    }

    /// One check flips an address's health either way.
    fn health_threshold(&self, _success: bool) -> usize {
        1
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
    /// `health_check.interval` (pools with `0s` never), until `shutdown`
    /// (a check under way is dropped, its connections closed).
    pub async fn check_health(&self, shutdown: &mut ShutdownWatch) {
        let mut checks: tokio::task::JoinSet<()> = self
            .pools
            .values()
            .map(|pool| (pool.clone(), pool.config.health_check().interval))
            .filter(|(_, interval)| !interval.is_zero())
            .map(|(pool, interval)| async move {
                loop {
                    pool.check().await;
                    tokio::time::sleep(interval).await;
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
