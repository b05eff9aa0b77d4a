//! Assembles the Pingora server from a validated config: the listeners
//! (clients, TLS, admin; the broker's connection runs on their runtime),
//! the housekeeping background service, and the signals that drain the
//! instance (the one shutdown path).

use crate::admin::Admin;
use crate::admission::{Admission, HeldSlots};
use crate::authorize::Authorizer;
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::broker::{Broker, UrlError};
use crate::config::Config;
use crate::fairness::{Clients, TrustedProxies};
use crate::front::Front;
use crate::gateway::Gateway;
use crate::hold::Holder;
use crate::http1::HeadLimits;
use crate::hub::Hub;
use crate::lifecycle::Lifecycle;
use crate::listener::{ClientListener, ListenError, Task};
use crate::metrics;
use crate::poll::Poller;
use crate::presence::webhooks::{Lane, Webhooks};
use crate::presence::Presence;
use crate::routes::RouteTable;
use crate::tls::{Certificates, TlsError};
use crate::upstream::Upstreams;
use crate::watch::Watcher;
use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::server::configuration::ServerConf;
use pingora::server::ListenFds;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

/// Why the gateway could not start, or stopped because it could not serve.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Broker(#[from] UrlError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// What the instance failed on while serving ([`Lifecycle::fail`]).
    #[error("{0}")]
    Failed(String),
}

/// How long a process that handed its sockets over keeps accepting
/// beside the new one before it drains.
const UPGRADE_OVERLAP: Duration = Duration::from_secs(1);
/// Longest wait, after a graceful upgrade, for the broker before accepting.
const BROKER_WAIT: Duration = Duration::from_secs(5);

/// How long a channel nobody polls stays in the hub after its last waiter.
pub const CHANNEL_LINGER: Duration = Duration::from_secs(30);

/// Builds the broker named by `config.broker.url`.
pub fn broker(config: &Config) -> Result<Arc<dyn Broker>, UrlError> {
    let url = &config.broker.url;
    let b = &config.broker;
    if url.starts_with("memory://") {
        Ok(Arc::new(MemoryBroker::new(
            b.history,
            b.history_ttl,
            config.limits.max_channels_kept,
        )))
    } else {
        let broker = RedisBroker::new(
            url,
            &b.sentinel_password,
            &b.namespace,
            b.history,
            b.history_ttl,
            b.max_pending,
        )?;
        let p = &config.publish;
        Ok(Arc::new(
            broker.with_replicas(p.replicas, p.replica_timeout),
        ))
    }
}

/// File descriptors kept for other than held polls (listeners, upstream
/// and broker connections, files) when `limits.max_held` is compared with
/// the open-file limit.
const FD_HEADROOM: u64 = 256;

/// The open-file limit after [`raise_open_file_limit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit in force afterwards, read back from the kernel (0
    /// when it cannot be read).
    pub limit: u64,
    /// Why `limit` is below what was wanted (the hard limit is lower, or
    /// the kernel refused); None when it reached it.
    pub short: Option<String>,
}

/// Raises the soft open-file limit (`RLIMIT_NOFILE`) to `wanted`, or to
/// the hard limit when that is lower; never lowers it. Returns the limit
/// then in force, as read back, and why it fell short of `wanted`.
pub fn raise_open_file_limit(wanted: u64) -> OpenFiles {
    let set = rlimit::increase_nofile_limit(wanted);
    let (limit, hard) = match rlimit::Resource::NOFILE.get() {
        Ok(limits) => limits,
        Err(e) => {
            return OpenFiles {
                limit: 0,
                short: Some(format!("cannot read the limit: {e}")),
            }
        }
    };
    let short = match set {
        Err(e) => Some(format!("setrlimit failed: {e}")),
        Ok(_) if limit < wanted => Some(format!("the hard limit is {hard}")),
        Ok(_) => None,
    };
    OpenFiles { limit, short }
}

/// Raises the open-file limit as far as the hard limit allows, at least
/// to what `max_held` polls need (every held poll is a socket), and warns
/// when it falls short. Returns the limit in force, read back.
fn open_file_limit(max_held: usize) -> u64 {
    let needed = (max_held as u64).saturating_add(FD_HEADROOM);
    let hard = rlimit::Resource::NOFILE.get().map_or(0, |(_, hard)| hard);
    let wanted = hard.max(needed);
    let files = raise_open_file_limit(wanted);
    let limit = files.limit;
    if let Some(why) = &files.short {
        tracing::warn!(
            wanted,
            limit,
            "cannot raise the open-file limit to {wanted}: {why}"
        );
    }
    if needed > limit {
        tracing::warn!(
            limit,
            max_held,
            "limits.max_held is above the open-file limit; polls past it will fail to connect"
        );
    }
    limit
}

/// Runs the gateway until SIGTERM, SIGINT or a graceful upgrade (SIGQUIT)
/// has drained it. With `upgrade`, takes over the listening sockets of the
/// running instance at `config.upgrade_sock` instead of binding them.
pub fn run(config: Config, routes: RouteTable, upgrade: bool) -> Result<(), StartError> {
    metrics::init();
    let open_files = open_file_limit(config.limits.max_held);
    tracing::debug!(open_files, "open-file limit");
    let certificates = match &config.tls {
        Some(tls) => Some(Certificates::load(&tls.cert, &tls.key)?),
        None => None,
    };
    let broker = broker(&config)?;
    metrics::BROKER_UP.set(broker.is_up() as i64);
    let hub = Hub::new(
        broker,
        config.broker.history,
        CHANNEL_LINGER,
        config.limits.max_active_channels,
        config.broker.delivery_queue,
    );
    let life = Arc::new(Lifecycle::default());
    let clients = Arc::new(Clients::new(
        config.limits.max_held_per_client,
        config.limits.polls_per_client,
        TrustedProxies::new(&config.trusted_proxies),
    ));

    let conf = ServerConf {
        threads: config.threads,
        upgrade_sock: config.upgrade_sock.clone(),
        // Draining is done (held polls answered, in-flight requests
        // finished) before Pingora is told to stop; this last second lets
        // the admin listener finish what it accepted meanwhile.
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let opt = pingora::server::configuration::Opt {
        upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    server.bootstrap();

    let routes = Arc::new(routes);
    let upstreams = Arc::new(Upstreams::new(&config.upstreams));
    let presence = config
        .webhooks
        .as_ref()
        .map(|hooks| Arc::new(Presence::new(hooks.linger)));
    let keepalive_secs = config.listener.keepalive_timeout.as_secs().max(1);
    let gateway = Gateway::new(
        &config,
        routes.clone(),
        upstreams.clone(),
        hub.clone(),
        life.clone(),
    );
    let front = Front {
        proxy: Arc::new(pingora::proxy::http_proxy(&server.configuration, gateway)),
        routes,
        poller: Poller {
            holder: Holder {
                hub: hub.clone(),
                life: life.clone(),
                write_timeout: config.limits.write_timeout,
                presence: presence.clone(),
            },
            admission: Admission {
                held: HeldSlots::new(config.limits.max_held),
                clients: clients.clone(),
                broker: hub.broker().clone(),
            },
            cors: config.cors.clone(),
            authorizer: Authorizer::new(upstreams.clone()),
        },
        watcher: Watcher::new(hub.clone(), upstreams.clone(), config.limits.max_body),
        life: life.clone(),
        limits: HeadLimits {
            max_head: config.limits.max_head as usize,
            header_timeout: config.limits.header_timeout,
            write_timeout: config.limits.write_timeout,
        },
        keepalive_secs,
        h2_max_streams: config.listener.h2_max_concurrent_streams,
        options: {
            let mut o = HttpServerOptions::default();
            o.h2c = true;
            // An HTTP/2 connection with no stream open lasts as long as an
            // idle HTTP/1.1 one.
            o.h2_idle_timeout = Some(config.listener.keepalive_timeout);
            o
        },
    };
    let admin = Admin {
        hub: hub.clone(),
        life: life.clone(),
        token: config.publish.token.clone(),
        max_body: config.limits.max_body,
        presence: presence.clone(),
    };
    // Held polls are woken (and answered) from the listeners' runtime, and
    // the broker's connection runs on it too: an announcement reaches its
    // waiters without a wake-up across runtimes. The connection lives as
    // long as the process, not until Pingora's shutdown: a draining
    // instance answers every request that still reaches it (one whose TLS
    // handshake or head was under way) until it exits.
    let mut beside: Vec<Task> = vec![
        Box::pin(hub.clone().run_deliveries()),
        Box::pin({
            let hub = hub.clone();
            async move {
                let (_forever, until) = tokio::sync::watch::channel(false);
                hub.broker().run(until).await
            }
        }),
    ];
    if let Some(certs) = &certificates {
        let life = life.clone();
        let until = async move { life.drained().await };
        beside.push(Box::pin(certs.clone().watch_files(until)));
    }
    // Taking over from a running instance, which keeps serving for a
    // moment: accept once the broker is reached (at most BROKER_WAIT), so
    // that the first polls here are not refused for want of it.
    let ready: Task = match upgrade {
        true => {
            let broker = hub.broker().clone();
            Box::pin(async move {
                let _ = tokio::time::timeout(BROKER_WAIT, broker.until_up()).await;
            })
        }
        false => Box::pin(async {}),
    };
    let fds = Arc::new(OnceLock::new());
    let listener = ClientListener::new(
        Arc::new(front),
        life.clone(),
        &config.listen,
        (&config.admin_listen, admin),
        config
            .tls
            .as_ref()
            .zip(certificates.clone())
            .map(|(tls, certs)| (tls.listen.clone(), certs, tls.handshake_timeout)),
        config.listener.clone(),
        config.threads,
        fds.clone(),
        upgrade,
    )?
    .run_beside(beside, ready);

    let housekeeping = background_service(
        "pollgate housekeeping",
        Housekeeping {
            hub: hub.clone(),
            upstreams: upstreams.clone(),
            clients,
        },
    );

    server.add_service(listener);
    server.add_service(housekeeping);
    if let (Some(presence), Some(hooks)) = (presence, &config.webhooks) {
        let (webhooks, lanes) =
            match Webhooks::new(hooks, upstreams.clone(), hub.broker().clone(), life.clone()) {
                Some((webhooks, lanes)) => (Some(webhooks), lanes),
                None => (None, Vec::new()),
            };
        server.add_service(background_service(
            "pollgate presence",
            PresenceService {
                presence,
                broker: hub.broker().clone(),
                webhooks,
                lanes: parking_lot::Mutex::new(lanes),
            },
        ));
    }
    tracing::info!(
        listen = %config.listen,
        tls = config.tls.as_ref().map_or("", |t| t.listen.as_str()),
        admin = %config.admin_listen,
        broker = %crate::secret::redact_url(&config.broker.url),
        upgrade,
        "pollgate starting"
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            life: life.clone(),
            hub: hub.clone(),
            grace: config.grace_period,
            fds,
            upgrade_sock: config.upgrade_sock.clone(),
            certificates,
        }),
    });
    match life.failure() {
        Some(reason) => Err(StartError::Failed(reason.to_string())),
        None => Ok(()),
    }
}

/// Every this many seconds, the subscriber counts of every channel are
/// shared with the fleet, not only those that changed.
const OCCUPANCY_ALL: u32 = 20;

/// Expires histories, forgets idle channels and the rates of idle
/// clients, and shares the subscriber counts with the fleet, once a
/// second; checks the upstreams' addresses.
struct Housekeeping {
    hub: Arc<Hub>,
    upstreams: Arc<Upstreams>,
    clients: Arc<Clients>,
}

#[async_trait]
impl BackgroundService for Housekeeping {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (upstreams, mut until) = (self.upstreams.clone(), shutdown.clone());
        tokio::spawn(async move { upstreams.check_health(&mut until).await });
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        // The subscriber counts shared with the fleet, and the ticks since
        // all of them were last (every OCCUPANCY_ALL ticks, well within the
        // broker's expiry of them).
        let (mut shared, mut ticks) = (std::collections::HashMap::new(), 0u32);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.hub.broker().maintain();
                    self.hub.sweep();
                    self.clients.housekeep();
                    metrics::BROKER_UP.set(self.hub.broker().is_up() as i64);
                    ticks = (ticks + 1) % OCCUPANCY_ALL;
                    self.hub.share_occupancy(&mut shared, ticks == 0).await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Presence (`webhooks:`): the fleet task ([`crate::presence::fleet`])
/// and the webhook lanes, until shutdown.
struct PresenceService {
    presence: Arc<Presence>,
    broker: Arc<dyn Broker>,
    webhooks: Option<Arc<Webhooks>>,
    /// The webhook lanes, taken when the service starts (once).
    lanes: parking_lot::Mutex<Vec<Lane>>,
}

#[async_trait]
impl BackgroundService for PresenceService {
    async fn start(&self, shutdown: ShutdownWatch) {
        let mut lanes = tokio::task::JoinSet::new();
        if let Some(webhooks) = &self.webhooks {
            for lane in std::mem::take(&mut *self.lanes.lock()) {
                let webhooks = webhooks.clone();
                lanes.spawn(async move { webhooks.run_lane(lane).await });
            }
        }
        let (presence, broker) = (self.presence.clone(), self.broker.clone());
        crate::presence::fleet::run(presence, broker, self.webhooks.clone(), shutdown).await;
        lanes.abort_all();
    }
}

/// The one way out. SIGTERM drains; SIGQUIT first hands every listening
/// socket to the `serve --upgrade` process waiting on `upgrade_sock`, then
/// drains the same way; SIGHUP re-reads the TLS certificate; SIGINT, and a
/// failure ([`Lifecycle::fail`]), stop at once. Draining answers held polls, stops accepting and closes idle
/// connections; once the requests in flight are done (or `grace` ends),
/// Pingora is told to stop, with nothing left to wait for.
struct Signals {
    life: Arc<Lifecycle>,
    /// Told to release its held polls when draining.
    hub: Arc<Hub>,
    grace: Duration,
    fds: Arc<OnceLock<ListenFds>>,
    upgrade_sock: String,
    certificates: Option<Arc<Certificates>>,
}

impl Signals {
    /// Sends the listening sockets to the new process; false when none
    /// could be sent (the instance then keeps serving).
    async fn hand_over(&self) -> bool {
        let Some(fds) = self.fds.get().cloned() else {
            tracing::error!("SIGQUIT: no listening sockets to hand over");
            return false;
        };
        let sock = self.upgrade_sock.clone();
        // Pingora's send retries with sleeps: off the async threads.
        let sent = tokio::task::spawn_blocking(move || {
            fds.lock()
                .send_to_sock(sock.as_str())
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match sent {
            Ok(n) => {
                tracing::info!(sockets = n, sock = %self.upgrade_sock, "SIGQUIT: listening sockets handed over");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, sock = %self.upgrade_sock, "SIGQUIT: cannot hand over the listening sockets; still serving");
                false
            }
        }
    }
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut quit), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
            signal(SignalKind::hangup()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return std::future::pending().await;
        };
        loop {
            tokio::select! {
                _ = int.recv() => return ShutdownSignal::FastShutdown,
                reason = self.life.failed() => {
                    tracing::error!(%reason, "cannot go on serving; exiting");
                    return ShutdownSignal::FastShutdown;
                }
                _ = term.recv() => {
                    tracing::info!(grace = ?self.grace, "SIGTERM: draining");
                    break;
                }
                _ = quit.recv() => if self.hand_over().await {
                    // Both instances accept for a moment, while the new one
                    // connects to the broker; then this one drains.
                    tokio::time::sleep(UPGRADE_OVERLAP).await;
                    tracing::info!(grace = ?self.grace, "graceful upgrade: draining");
                    break;
                },
                _ = hup.recv() => match &self.certificates {
                    // In a task of its own: a read that blocks must not
                    // keep this loop from the next signal.
                    Some(certs) => {
                        let certs = certs.clone();
                        tokio::spawn(async move {
                            match certs.reload().await {
                                Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                                Err(e) => tracing::warn!(error = %e, "SIGHUP: keeping the previous certificate"),
                            }
                        });
                    }
                    None => tracing::info!("SIGHUP: no TLS listener, nothing to reload"),
                },
            }
        }
        // The flag first, then the held polls (see `Hub::release_all`).
        self.life.drain();
        self.hub.release_all();
        let clean = self.life.wait_idle(self.grace).await;
        tracing::info!(clean, "drained; exiting");
        ShutdownSignal::GracefulTerminate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_reported_is_the_one_in_force() {
        let (_, hard) = rlimit::Resource::NOFILE.get().unwrap();
        // Asking for no more than is in force changes nothing.
        let now = raise_open_file_limit(1);
        assert_eq!(now.short, None);
        assert_eq!(now.limit, rlimit::Resource::NOFILE.get().unwrap().0);
        // Past the hard limit: raised to it, not to what was asked, and
        // said so.
        if hard < u64::MAX {
            let files = raise_open_file_limit(hard + 1);
            assert_eq!(files.limit, hard);
            assert_eq!(files.short, Some(format!("the hard limit is {hard}")));
            assert_eq!(rlimit::Resource::NOFILE.get().unwrap(), (hard, hard));
            // The hard limit itself is reached.
            assert_eq!(raise_open_file_limit(hard).short, None);
        }
    }
}
