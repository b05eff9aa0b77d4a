//! Assembles the Pingora server from a validated config: the gateway
//! service, the admin service, the housekeeping background service and the
//! signal handling that drains held polls.

use crate::admin::Admin;
use crate::authorize::Authorizer;
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::broker::Broker;
use crate::config::Config;
use crate::front::{Front, HeadLimits};
use crate::gateway::Gateway;
use crate::hub::Hub;
use crate::lifecycle::Lifecycle;
use crate::listener::Listener;
use crate::metrics;
use crate::poll::{HeldSlots, Poller};
use crate::routes::RouteTable;
use crate::upstream::Upstreams;
use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use std::sync::Arc;
use std::time::Duration;

/// How long a channel nobody polls stays in the hub after its last waiter.
pub const CHANNEL_LINGER: Duration = Duration::from_secs(30);

/// Builds the broker named by `config.broker.url`.
pub fn broker(config: &Config) -> Result<Arc<dyn Broker>, String> {
    let url = &config.broker.url;
    let b = &config.broker;
    if url.starts_with("memory://") {
        Ok(Arc::new(MemoryBroker::new(b.history, b.history_ttl)))
    } else {
        Ok(Arc::new(RedisBroker::new(
            url,
            &b.namespace,
            b.history,
            b.history_ttl,
            b.max_pending,
        )?))
    }
}

/// Raises the soft open-file limit to the hard one (every held poll is a
/// socket) and warns when `max_held` cannot fit under it. Returns the limit.
fn raise_open_file_limit(max_held: usize) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    let limit = lim.rlim_cur;
    if (max_held as u64) + 256 > limit {
        tracing::warn!(
            limit,
            max_held,
            "limits.max_held is above the open-file limit; polls past it will fail to connect"
        );
    }
    limit
}

/// Runs the gateway until SIGTERM/SIGINT; exits the process.
pub fn run(config: Config, routes: RouteTable) -> Result<(), String> {
    metrics::init();
    raise_open_file_limit(config.limits.max_held);
    let broker = broker(&config)?;
    metrics::BROKER_UP.set(broker.is_up() as i64);
    let hub = Hub::new(
        broker,
        config.broker.history,
        CHANNEL_LINGER,
        config.limits.max_active_channels,
    );
    let life = Arc::new(Lifecycle::default());

    let conf = ServerConf {
        threads: config.threads,
        grace_period_seconds: Some(config.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let routes = Arc::new(routes);
    let upstreams = Arc::new(Upstreams::new(&config.upstreams));
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
            hub: hub.clone(),
            life: life.clone(),
            held: HeldSlots::new(config.limits.max_held),
            cors: config.cors.clone(),
            authorizer: Authorizer::new(upstreams),
            write_timeout: config.limits.write_timeout,
        },
        life: life.clone(),
        limits: HeadLimits {
            max_head: config.limits.max_head as usize,
            header_timeout: config.limits.header_timeout,
            write_timeout: config.limits.write_timeout,
        },
    };
    let listener = Listener::bind(&config.listen, Arc::new(front))?;
    let mut gateway = pingora::services::background::GenBackgroundService::new(
        "pollgate gateway".to_string(),
        Arc::new(listener),
    );
    gateway.threads = Some(config.threads);

    let admin = Admin {
        hub: hub.clone(),
        life: life.clone(),
        token: config.publish.token.clone(),
        max_body: config.limits.max_body,
    };
    let mut admin = Service::new("pollgate admin".to_string(), admin);
    admin.threads = Some(1);
    admin.add_tcp(&config.admin_listen);

    let housekeeping =
        background_service("pollgate housekeeping", Housekeeping { hub: hub.clone() });
    let connection = background_service("pollgate broker", BrokerConnection { hub });

    server.add_service(gateway);
    server.add_service(admin);
    server.add_service(housekeeping);
    server.add_service(connection);
    tracing::info!(listen = %config.listen, admin = %config.admin_listen, broker = %crate::secret::redact_url(&config.broker.url), "pollgate starting");
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            life,
            grace: config.grace_period,
        }),
    });
    Ok(())
}

/// Expires histories and forgets idle channels, once a second.
struct Housekeeping {
    hub: Arc<Hub>,
}

#[async_trait]
impl BackgroundService for Housekeeping {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.hub.broker().maintain();
                    self.hub.sweep();
                    metrics::BROKER_UP.set(self.hub.broker().is_up() as i64);
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Runs the broker's connection work (nothing for the memory broker).
struct BrokerConnection {
    hub: Arc<Hub>,
}

#[async_trait]
impl BackgroundService for BrokerConnection {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.hub.broker().run(shutdown).await;
    }
}

/// SIGTERM drains: held polls are answered at once, and the process exits
/// as soon as nothing is in flight (or when `grace` ends), rather than
/// sitting out Pingora's whole grace period.
struct Signals {
    life: Arc<Lifecycle>,
    grace: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => return ShutdownSignal::FastShutdown,
            _ = quit.recv() => return ShutdownSignal::GracefulUpgrade,
            _ = term.recv() => {}
        }
        tracing::info!(grace = ?self.grace, "SIGTERM: draining held polls");
        self.life.drain();
        let life = self.life.clone();
        let grace = self.grace;
        std::thread::spawn(move || {
            // Give Pingora a moment to stop its listeners, then wait for the rest.
            std::thread::sleep(Duration::from_millis(50));
            let clean = life.wait_idle(grace);
            tracing::info!(clean, "drained; exiting");
            std::process::exit(0);
        });
        ShutdownSignal::GracefulTerminate
    }
}
