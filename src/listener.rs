//! The client listeners: a Pingora service that owns the listening
//! sockets of `listen` (HTTP/1.1 and HTTP/2 with prior knowledge) and
//! `tls.listen` (HTTPS, HTTP/2 or HTTP/1.1 by ALPN), and serves every
//! connection with the [`Front`] door.
//!
//! The sockets are declared to Pingora ([`Service::listen_addresses`]) and
//! kept in its table of listening fds, so that a graceful upgrade hands them
//! to the next process; a process started with `--upgrade` adopts the ones
//! it received instead of binding. Accepting stops when the instance drains.
//!
//! Connections are unbuffered at L4 and written through [`Conn`], which
//! gathers an answer's writes into one segment. HTTP/1 connections run the
//! front door's lean loop; HTTP/2 ones (ALPN `h2`, or the h2c preface) go
//! through Pingora's HTTP/2 server, one task per stream.

use crate::config::ListenerConfig;
use crate::front::Front;
use crate::lifecycle::Lifecycle;
use crate::tls::Certificates;
use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::listeners::tls::Acceptor;
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, SocketDigest, TimingDigest, ALPN,
};
use pingora::protocols::{Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType};
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::Service;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The first bytes of the HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";
/// Longest wait, after a graceful upgrade, for the broker before accepting.
const BROKER_WAIT: Duration = Duration::from_secs(5);
/// How often the certificate files are checked for a change.
const CERT_CHECK: Duration = Duration::from_secs(2);

/// Most bytes gathered before writing (an answer larger than this is
/// written as it comes).
const MAX_GATHER: usize = 16 * 1024;

/// A TCP connection as Pingora sees it, without buffers.
#[derive(Debug)]
struct Conn {
    tcp: TcpStream,
    digest: Arc<SocketDigest>,
    pending: Vec<u8>,
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

/// Writes are gathered until the next flush, so that an answer's header and
/// body leave in one segment; the buffer only exists while an answer is
/// being written (Pingora flushes at the end of each answer).
impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.pending.len() + buf.len() > MAX_GATHER {
            if self.as_mut().poll_drain(cx)?.is_pending() {
                return Poll::Pending;
            }
            if buf.len() > MAX_GATHER {
                return Pin::new(&mut self.tcp).poll_write(cx, buf);
            }
        }
        self.pending.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.as_mut().poll_drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.as_mut().poll_drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl Conn {
    fn new(tcp: TcpStream) -> Conn {
        let digest = Arc::new(SocketDigest::from_raw_fd(tcp.as_raw_fd()));
        Conn {
            tcp,
            digest,
            pending: Vec::new(),
        }
    }

    /// Writes out everything gathered; frees the buffer once empty.
    fn poll_drain(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let this = &mut *self;
            let n = match Pin::new(&mut this.tcp).poll_write(cx, &this.pending) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            this.pending.drain(..n);
        }
        self.pending = Vec::new();
        Poll::Ready(Ok(()))
    }
}

#[async_trait]
impl Shutdown for Conn {
    async fn shutdown(&mut self) {
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut self.tcp).await;
    }
}

impl UniqueID for Conn {
    fn id(&self) -> UniqueIDType {
        self.tcp.as_raw_fd()
    }
}

impl Ssl for Conn {}

#[async_trait]
impl Peek for Conn {}

impl GetTimingDigest for Conn {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        Vec::new()
    }
}

impl GetProxyDigest for Conn {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        None
    }
}

impl GetSocketDigest for Conn {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        Some(self.digest.clone())
    }
}

/// Serves one HTTP/1 connection: request after request, as Pingora's own
/// HTTP/1 path does (the first request within the header timeout, then the
/// keep-alive each answer sets, at most `request_limit` requests when set),
/// without carrying its HTTP/2 negotiation state.
async fn serve_h1(front: Arc<Front>, stream: Stream, request_limit: u32, shutdown: ShutdownWatch) {
    let mut session = ServerSession::new_http1(stream);
    if request_limit > 0 {
        session.set_keepalive_reuses_remaining(Some(request_limit - 1));
    }
    let mut next = front.process_new_http(session, &shutdown).await;
    while let Some((stream, settings)) = next.map(|r| r.consume()) {
        let mut session = ServerSession::new_http1(stream);
        if let Some(settings) = settings {
            settings.apply_to_session(&mut session);
        }
        next = front.process_new_http(session, &shutdown).await;
    }
}

/// True when a plaintext connection opens with the HTTP/2 preface (h2c
/// with prior knowledge). Waits for its first bytes at most `wait`.
async fn starts_h2c(tcp: &TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; H2_PREFACE.len()];
    match tokio::time::timeout(wait, tcp.peek(&mut buf)).await {
        Ok(Ok(n)) if n >= 3 => buf[..n] == H2_PREFACE[..n],
        _ => false,
    }
}

/// One listening address of the service.
struct Endpoint {
    addr: String,
    /// The TLS acceptor of an HTTPS endpoint.
    tls: Option<Arc<Acceptor>>,
}

/// The client listeners as a Pingora service.
pub struct ClientListener {
    front: Arc<Front>,
    life: Arc<Lifecycle>,
    endpoints: Vec<Endpoint>,
    options: ListenerConfig,
    tls: Option<(Arc<Certificates>, Duration)>,
    threads: usize,
    /// Pingora's table of listening fds, kept for the graceful upgrade.
    fds: Arc<OnceLock<ListenFds>>,
}

impl ClientListener {
    /// A service listening on `listen` and, with `tls`, on its address with
    /// its certificates and handshake timeout; `fds` receives Pingora's
    /// table of listening sockets when the service starts.
    pub fn new(
        front: Arc<Front>,
        life: Arc<Lifecycle>,
        listen: &str,
        tls: Option<(String, Arc<Certificates>, Duration)>,
        options: ListenerConfig,
        threads: usize,
        fds: Arc<OnceLock<ListenFds>>,
    ) -> ClientListener {
        let mut endpoints = vec![Endpoint {
            addr: listen.to_string(),
            tls: None,
        }];
        let tls = tls.map(|(addr, certs, handshake)| {
            endpoints.push(Endpoint {
                addr,
                tls: Some(Arc::new(certs.acceptor())),
            });
            (certs, handshake)
        });
        ClientListener {
            front,
            life,
            endpoints,
            options,
            tls,
            threads,
            fds,
        }
    }

    /// The listening socket for `addr`: the one inherited through a
    /// graceful upgrade, or a new one (registered for the next upgrade).
    fn socket(&self, addr: &str, fds: Option<&ListenFds>) -> io::Result<std::net::TcpListener> {
        if let Some(fd) = fds.and_then(|f| f.lock().get(addr).copied()) {
            tracing::info!(%addr, "listening on an inherited socket");
            // SAFETY: the fd was handed over for this address and is ours now.
            let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            listener.set_nonblocking(true)?;
            return Ok(listener);
        }
        let listener = bind(addr, &self.options)?;
        if let Some(fds) = fds {
            // The table keeps a duplicate, so that closing ours on drain
            // leaves the socket to the process it was handed to.
            let dup = listener.try_clone()?.into_raw_fd();
            fds.lock().add(addr.to_string(), dup);
        }
        Ok(listener)
    }
}

/// What every accepted connection needs.
#[derive(Clone)]
struct Acceptance {
    front: Arc<Front>,
    life: Arc<Lifecycle>,
    tcp_keepalive: Duration,
    request_limit: u32,
    handshake: Duration,
}

impl Acceptance {
    /// Accepts connections on `listener` until draining or shutdown.
    async fn run(
        self,
        listener: tokio::net::TcpListener,
        tls: Option<Arc<Acceptor>>,
        mut shutdown: ShutdownWatch,
    ) {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = self.life.drained() => break,
                _ = shutdown.changed() => break,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors, most likely: back off a little.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if !self.tcp_keepalive.is_zero() {
                let probe = socket2::TcpKeepalive::new().with_time(self.tcp_keepalive);
                let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&probe);
            }
            tokio::spawn(self.clone().serve(tcp, tls.clone(), shutdown.clone()));
        }
    }

    /// Serves one accepted connection: TLS handshake when `tls`, then
    /// HTTP/2 or HTTP/1.
    async fn serve(self, tcp: TcpStream, tls: Option<Arc<Acceptor>>, shutdown: ShutdownWatch) {
        let h2c = tls.is_none() && starts_h2c(&tcp, self.front.limits.header_timeout).await;
        let conn = Conn::new(tcp);
        let stream: Stream = match tls {
            None => Box::new(conn),
            Some(acceptor) => {
                match tokio::time::timeout(self.handshake, acceptor.tls_handshake(conn)).await {
                    Ok(Ok(tls)) => Box::new(tls),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("TLS handshake timed out");
                        return;
                    }
                }
            }
        };
        if h2c || matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            self.front.process_new(stream, &shutdown).await;
        } else {
            serve_h1(self.front, stream, self.request_limit, shutdown).await;
        }
    }
}

/// Binds `addr` with the listener's socket options.
fn bind(addr: &str, options: &ListenerConfig) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let addr: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if options.reuseport {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(options.backlog.min(i32::MAX as u32) as i32)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

#[async_trait]
impl Service for ClientListener {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        if let Some(fds) = &fds {
            let _ = self.fds.set(fds.clone());
        }
        let acceptance = Acceptance {
            front: self.front.clone(),
            life: self.life.clone(),
            tcp_keepalive: self.options.tcp_keepalive,
            request_limit: self.options.keepalive_request_limit,
            handshake: self.tls.as_ref().map_or(Duration::ZERO, |t| t.1),
        };
        let inherited = fds.as_ref().is_some_and(|f| {
            let table = f.lock();
            self.endpoints.iter().any(|e| table.get(&e.addr).is_some())
        });
        if inherited {
            // Taking over from a running instance, which keeps serving for
            // a moment: accept once the broker is reached, so that the
            // first polls here are not refused for want of it.
            let broker = self.front.poller.hub.broker().clone();
            let deadline = tokio::time::Instant::now() + BROKER_WAIT;
            while !broker.is_up() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let mut loops = Vec::new();
        for endpoint in &self.endpoints {
            let socket = self
                .socket(&endpoint.addr, fds.as_ref())
                .and_then(tokio::net::TcpListener::from_std);
            match socket {
                Ok(listener) => loops.push(tokio::spawn(acceptance.clone().run(
                    listener,
                    endpoint.tls.clone(),
                    shutdown.clone(),
                ))),
                Err(e) => tracing::error!(addr = %endpoint.addr, error = %e, "cannot listen"),
            }
        }
        if let Some((certs, _)) = &self.tls {
            let certs = certs.clone();
            let life = self.life.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(CERT_CHECK);
                loop {
                    tokio::select! {
                        _ = tick.tick() => { certs.reload_if_changed(); }
                        _ = life.drained() => return,
                    }
                }
            });
        }
        for accept in loops {
            let _ = accept.await;
        }
        self.front.http_cleanup().await;
    }

    fn name(&self) -> &str {
        "pollgate gateway"
    }

    fn threads(&self) -> Option<usize> {
        Some(self.threads)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(self.endpoints.iter().map(|e| e.addr.clone()).collect())
    }
}
