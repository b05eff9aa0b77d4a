//! The listeners: a Pingora service that owns the listening sockets of
//! `listen` (HTTP/1.1 and HTTP/2 with prior knowledge) and `tls.listen`
//! (HTTPS, HTTP/2 or HTTP/1.1 by ALPN), serving every connection with the
//! [`Front`] door, and of `admin_listen`, serving the [`Admin`] app. All
//! run on this service's runtime, with the hub's delivery task and the
//! broker's connection: a publish meets its held polls without a wake-up
//! across runtimes.
//!
//! The sockets are declared to Pingora ([`Service::listen_addresses`]) and
//! kept in its table of listening fds, so that a graceful upgrade hands them
//! to the next process; a process started with `--upgrade` adopts the ones
//! it received instead of binding. Accepting stops when the instance drains
//! (on the admin listener, at shutdown). An address that cannot be listened
//! on after an upgrade fails the instance ([`Lifecycle::fail`]).
//!
//! The service only listens; what must run on its runtime beside the
//! accept loops (the hub's deliveries, the broker's connection, the
//! certificate check) and what accepting waits for (the broker, after an
//! upgrade) are given to it by `server.rs` ([`ClientListener::run_beside`]).
//!
//! Connections are unbuffered at L4 and written through
//! `crate::tcp::TcpConn`, which gathers an answer's writes into one
//! segment (a vectored write goes straight out). HTTP/1 connections, client and admin, run the loop of
//! [`http1::serve`]; HTTP/2 ones (ALPN `h2`, or the h2c preface) go
//! through Pingora's HTTP/2 server, one task per stream, and are closed
//! when no first request arrives within `limits.header_timeout`.

use crate::admin::Admin;
use crate::config::ListenerConfig;
use crate::front::Front;
use crate::http1::{self, Settings};
use crate::lifecycle::{InFlight, Lifecycle};
use crate::metrics::Refusal;
use crate::tcp::TcpConn;
use crate::tls::{Certificates, TlsConn};
use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::{Stream, ALPN};
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::Service;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpStream;

/// The first bytes of the HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";
/// An address that cannot be listened on.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct ListenError {
    pub addr: String,
    pub source: io::Error,
}

/// Work that runs on the listeners' runtime, given by `server.rs`.
pub type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Whether a plaintext connection opens with the HTTP/2 preface (h2c with
/// prior knowledge); None when it sends nothing within `wait` or closes.
async fn starts_h2c(tcp: &TcpStream, wait: Duration) -> Option<bool> {
    let mut buf = [0u8; H2_PREFACE.len()];
    match tokio::time::timeout(wait, tcp.peek(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Some(n >= 3 && buf[..n] == H2_PREFACE[..n]),
        _ => None,
    }
}

/// One listening address of the service.
struct Endpoint {
    addr: String,
    serves: Serves,
    /// Bound at construction (None when the socket is to be inherited).
    bound: Option<std::net::TcpListener>,
}

/// What an endpoint's connections are served with.
#[derive(Clone)]
enum Serves {
    /// Clients over plain TCP (HTTP/1.1, or HTTP/2 with prior knowledge).
    Clients,
    /// Clients over TLS, with this configuration.
    Tls(Arc<rustls::ServerConfig>),
    /// The admin API (publish, metrics, health): on the runtime of the
    /// held polls, so that a publish reaches its waiters without crossing
    /// threads.
    Admin(Arc<Admin>),
}

/// The client listeners as a Pingora service.
pub struct ClientListener {
    front: Arc<Front>,
    life: Arc<Lifecycle>,
    endpoints: Vec<Endpoint>,
    options: ListenerConfig,
    /// The TLS handshake timeout (zero without TLS).
    handshake: Duration,
    threads: usize,
    /// Spawned on the runtime when the service starts (behind a lock only
    /// because a `Service` is `Sync`).
    beside: Mutex<Vec<Task>>,
    /// Awaited before the first accept.
    ready: Mutex<Option<Task>>,
    /// Pingora's table of listening fds, kept for the graceful upgrade.
    fds: Arc<OnceLock<ListenFds>>,
}

impl ClientListener {
    /// A service listening on `listen`, on the admin address with `admin`,
    /// and, with `tls`, on its address with its certificates and handshake
    /// timeout; `fds` receives Pingora's table of listening sockets when
    /// the service starts. Binds now (a taken port is an error at start)
    /// unless `inherit`: then the sockets come from the instance being
    /// upgraded.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        front: Arc<Front>,
        life: Arc<Lifecycle>,
        listen: &str,
        admin: (&str, Admin),
        tls: Option<(String, Arc<Certificates>, Duration)>,
        options: ListenerConfig,
        threads: usize,
        fds: Arc<OnceLock<ListenFds>>,
        inherit: bool,
    ) -> Result<ClientListener, ListenError> {
        let bind_now = |addr: &str| match inherit {
            true => Ok(None),
            false => bind(addr, &options)
                .map(Some)
                .map_err(|source| ListenError {
                    addr: addr.to_string(),
                    source,
                }),
        };
        let mut endpoints = vec![
            Endpoint {
                addr: listen.to_string(),
                serves: Serves::Clients,
                bound: bind_now(listen)?,
            },
            Endpoint {
                addr: admin.0.to_string(),
                serves: Serves::Admin(Arc::new(admin.1)),
                bound: bind_now(admin.0)?,
            },
        ];
        let handshake = match tls {
            Some((addr, certs, handshake)) => {
                endpoints.push(Endpoint {
                    bound: bind_now(&addr)?,
                    addr,
                    serves: Serves::Tls(certs.server_config()),
                });
                handshake
            }
            None => Duration::ZERO,
        };
        Ok(ClientListener {
            front,
            life,
            endpoints,
            options,
            handshake,
            threads,
            fds,
            beside: Mutex::new(Vec::new()),
            ready: Mutex::new(None),
        })
    }

    /// Runs `tasks` on this service's runtime, beside the accept loops,
    /// and accepts only once `ready` resolves. Returns the service.
    pub fn run_beside(mut self, tasks: Vec<Task>, ready: Task) -> ClientListener {
        self.beside = Mutex::new(tasks);
        self.ready = Mutex::new(Some(ready));
        self
    }

    /// The listening socket of `endpoint`: the one inherited through a
    /// graceful upgrade, or the one bound at start, or (an upgrade to an
    /// address the old instance did not have) one bound now. It is
    /// registered in Pingora's table for the next upgrade (by its number:
    /// it closes when this instance drains, leaving the socket to the
    /// process it went to). An error means the address cannot be listened on.
    fn socket(
        endpoint: &mut Endpoint,
        fds: Option<&ListenFds>,
        options: &ListenerConfig,
    ) -> io::Result<std::net::TcpListener> {
        let addr = &endpoint.addr;
        let inherited = fds.and_then(|f| f.lock().get(addr).copied());
        let listener = match (endpoint.bound.take(), inherited) {
            (Some(listener), _) => listener,
            (None, Some(fd)) => {
                tracing::info!(%addr, "listening on an inherited socket");
                // SAFETY: the fd was handed over for this address and is ours now.
                let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
                listener.set_nonblocking(true)?;
                return Ok(listener);
            }
            (None, None) => {
                tracing::info!(%addr, "listening on an address new in this upgrade");
                bind(addr, options)?
            }
        };
        if let Some(fds) = fds {
            fds.lock().add(addr.to_string(), listener.as_raw_fd());
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
    /// How the client listeners serve HTTP/1 connections.
    settings: Settings,
    handshake: Duration,
}

impl Acceptance {
    /// Accepts connections on `listener` until shutdown, and on a client
    /// endpoint until draining (the admin API answers until the end:
    /// readiness says it is draining).
    async fn run(
        self,
        listener: tokio::net::TcpListener,
        serves: Serves,
        mut shutdown: ShutdownWatch,
    ) {
        let admin = matches!(serves, Serves::Admin(_));
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = self.life.drained(), if !admin => break,
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
            // A client connection counts as in flight from its accept
            // until its first request is answered (through the TLS
            // handshake and, on HTTP/2, until its first stream), so that
            // a drain does not end under a connection it accepted.
            let accepted = (!admin).then(|| self.life.enter());
            let serving = self
                .clone()
                .serve(tcp, serves.clone(), shutdown.clone(), accepted);
            tokio::spawn(crate::prefetch::Warm::new(serving));
        }
    }

    /// Serves one accepted connection: TLS handshake on a TLS endpoint,
    /// then HTTP/2 or HTTP/1; on the admin endpoint, the admin app,
    /// request after request.
    async fn serve(
        self,
        tcp: TcpStream,
        serves: Serves,
        shutdown: ShutdownWatch,
        accepted: Option<InFlight>,
    ) {
        let tls = match serves {
            Serves::Clients => None,
            Serves::Tls(config) => Some(config),
            Serves::Admin(admin) => {
                // As a client connection, without a request limit.
                let settings = Settings {
                    request_limit: 0,
                    require_host: false,
                    ..self.settings
                };
                let conn = Box::new(TcpConn::new(tcp));
                http1::serve(admin, conn, settings, &self.life, None, &shutdown).await;
                return;
            }
        };
        // An HTTP/2 connection's first request is due within
        // `header_timeout` of its start (after the TLS handshake on TLS).
        let mut started = tokio::time::Instant::now();
        // The transient steps are boxed: their state would otherwise be
        // part of every connection's task for as long as it lives.
        let h2c = match tls {
            Some(_) => false,
            None => match Box::pin(starts_h2c(&tcp, self.settings.limits.header_timeout)).await {
                Some(h2c) => h2c,
                None => return, // silent or closed: as a head that never comes
            },
        };
        let conn = TcpConn::new(tcp);
        let stream: Stream = match tls {
            None => Box::new(conn),
            Some(config) => {
                let handshake = tokio::time::timeout(self.handshake, TlsConn::accept(conn, config));
                match Box::pin(handshake).await {
                    Ok(Ok(tls)) => {
                        started = tokio::time::Instant::now();
                        Box::new(tls)
                    }
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
            let deadline = started + self.settings.limits.header_timeout;
            serve_h2(self.front.clone(), stream, deadline, accepted, &shutdown).await;
        } else {
            let front = self.front.clone();
            let settings = self.settings;
            http1::serve(front, stream, settings, &self.life, accepted, &shutdown).await;
        }
    }
}

/// Serves an HTTP/2 connection with Pingora's HTTP/2 server, on the front
/// door. Until its first request (its first complete `HEADERS`) has
/// arrived, the connection lives until `deadline` at most: one that has
/// not sent the whole preface, its `SETTINGS` and a request by then is
/// dropped (closed without a `GOAWAY`) and counted as a `header_timeout`
/// refusal. Once a request has arrived, the connection lasts as Pingora's
/// HTTP/2 server keeps it (`listener.keepalive_timeout` with no stream
/// open). The connection counts as in flight (`accepted`, from its accept)
/// until its first stream does, and each stream while it is served. Returns
/// when the connection is done.
async fn serve_h2(
    front: Arc<Front>,
    stream: Stream,
    deadline: tokio::time::Instant,
    accepted: Option<InFlight>,
    shutdown: &ShutdownWatch,
) {
    let app = Arc::new(FirstRequest {
        front,
        arrived: tokio::sync::Notify::new(),
    });
    let serving = app.process_new(stream, shutdown);
    let first = async {
        let arrived = tokio::time::timeout_at(deadline, app.arrived.notified()).await;
        // The first stream counts itself from here.
        drop(accepted);
        if arrived.is_ok() {
            // From now on the connection is Pingora's to keep or close.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = serving => {}
        _ = first => {
            Refusal::HeaderTimeout.count();
            tracing::debug!("HTTP/2 connection without a request within limits.header_timeout; closed");
        }
    }
}

/// The front door's HTTP/2 app for one connection, noting when its first
/// stream arrives (see [`serve_h2`]).
struct FirstRequest {
    front: Arc<Front>,
    /// Notified at each stream; its first permit ends the deadline.
    arrived: tokio::sync::Notify,
}

#[async_trait]
impl HttpServerApp for FirstRequest {
    /// Serves one HTTP/2 stream with the front door (counted in flight
    /// while it is), once it has noted that a request arrived; returns what
    /// the front door returns (None).
    async fn process_new_http(
        self: &Arc<Self>,
        session: pingora::protocols::http::ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<pingora::apps::ReusedHttpStream> {
        let _in_flight = self.front.life.enter();
        self.arrived.notify_one();
        self.front.process_new_http(session, shutdown).await
    }

    /// The front door's options (h2c, the idle timeout).
    fn server_options(&self) -> Option<&pingora::apps::HttpServerOptions> {
        self.front.server_options()
    }

    /// The front door's HTTP/2 settings (`h2_max_concurrent_streams`).
    fn h2_options(&self) -> Option<pingora::protocols::http::v2::server::H2Options> {
        self.front.h2_options()
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
            settings: self.front.settings(self.options.keepalive_request_limit),
            handshake: self.handshake,
        };
        for task in std::mem::take(self.beside.get_mut()) {
            tokio::spawn(task);
        }
        let ready = self.ready.get_mut().take();
        if let Some(ready) = ready {
            ready.await;
        }
        let mut loops = Vec::new();
        for endpoint in &mut self.endpoints {
            let socket = Self::socket(endpoint, fds.as_ref(), &self.options)
                .and_then(tokio::net::TcpListener::from_std);
            match socket {
                Ok(listener) => loops.push(tokio::spawn(acceptance.clone().run(
                    listener,
                    endpoint.serves.clone(),
                    shutdown.clone(),
                ))),
                // Only an upgrade (the other addresses were bound at
                // start) to an address that is taken: serving without
                // this listener would look ready but lose its clients.
                Err(source) => self.life.fail(
                    ListenError {
                        addr: endpoint.addr.clone(),
                        source,
                    }
                    .to_string(),
                ),
            }
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
