//! The configuration as plain data (docs/configuration.md): the YAML's
//! shape and defaults, and [`ConfigErrors`], the problems found in it.
//!
//! `load.rs` reads a file into a [`Config`] (`${VAR}` expansion, then
//! YAML; [`Config::load`], [`Config::parse`]); `check.rs` checks what
//! parsing cannot ([`Config::validate`]). Nothing here builds anything the
//! gateway runs with, nor imports a module that does: `routes.rs` compiles
//! the routes of a checked config (`RouteTable::compile`), and `cli::load`
//! does the whole (read, override, check, compile). Every problem is a
//! line naming the file, the key path and what is wrong, which `pollgate
//! check` prints one per line.

mod check;
mod load;

pub use self::load::{expand_env, EnvError};
pub use crate::secret::redact_url;
use crate::units;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Client-facing HTTP listener (HTTP/1.1 and h2c).
    pub listen: String,
    /// Optional client-facing HTTPS listener (HTTP/2 and HTTP/1.1 by ALPN).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Socket and connection settings of the client listeners.
    pub listener: ListenerConfig,
    /// Where a `serve --upgrade` instance receives the listening sockets.
    pub upgrade_sock: String,
    /// Publish API, metrics, health.
    pub admin_listen: String,
    /// Worker threads of the gateway service.
    pub threads: usize,
    /// Time allowed to drain on SIGTERM.
    #[serde(with = "units::duration")]
    pub grace_period: Duration,
    pub broker: BrokerConfig,
    pub publish: PublishConfig,
    pub limits: Limits,
    /// CIDRs (or single addresses) of the load balancers whose
    /// `X-Forwarded-For` names the client, for the per-client limits.
    pub trusted_proxies: Vec<String>,
    pub cors: Cors,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    /// Presence and its webhooks; presence is tracked only when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<WebhooksConfig>,
}

/// `webhooks`: presence tracking (`linger`), and where its events are
/// POSTed (`upstream` and `path`; none when `upstream` is unset).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// The upstream events are POSTed to; unset: presence is tracked (for
    /// `GET /v1/presence/{channel}`) and no event is sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    pub path: String,
    /// The events sent (all four by default).
    pub events: Vec<WebhookEvent>,
    /// How long a client stays present after its last poll ended.
    #[serde(with = "units::duration")]
    pub linger: Duration,
    /// Key of each request's `Pollgate-Signature` (HMAC-SHA256); a secret.
    pub secret: String,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            upstream: None,
            path: "/pollgate/events".into(),
            events: WebhookEvent::ALL.to_vec(),
            linger: Duration::from_secs(15),
            secret: String::new(),
        }
    }
}

/// A presence event (`webhooks.events`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookEvent {
    /// The first client anywhere in the fleet on a channel.
    ChannelOccupied,
    /// The last client anywhere in the fleet on a channel left.
    ChannelVacated,
    /// An identified subscriber became present (anywhere in the fleet).
    SubscriberJoined,
    /// An identified subscriber is no longer present anywhere.
    SubscriberLeft,
}

impl WebhookEvent {
    pub const ALL: [WebhookEvent; 4] = [
        WebhookEvent::ChannelOccupied,
        WebhookEvent::ChannelVacated,
        WebhookEvent::SubscriberJoined,
        WebhookEvent::SubscriberLeft,
    ];

    /// The event's name, as in the config and the request body.
    pub fn name(self) -> &'static str {
        match self {
            WebhookEvent::ChannelOccupied => "channel_occupied",
            WebhookEvent::ChannelVacated => "channel_vacated",
            WebhookEvent::SubscriberJoined => "subscriber_joined",
            WebhookEvent::SubscriberLeft => "subscriber_left",
        }
    }
}

/// The HTTPS listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub listen: String,
    /// PEM certificate chain; re-read when it changes and on SIGHUP.
    pub cert: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// Longest time a TLS handshake may take.
    #[serde(default = "default_handshake_timeout", with = "units::duration")]
    pub handshake_timeout: Duration,
}

/// Socket and connection settings of the client listeners.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    /// Accept queue length.
    pub backlog: u32,
    /// SO_REUSEPORT on the listening sockets.
    pub reuseport: bool,
    /// Idle time before TCP keepalive probes (0s: off).
    #[serde(with = "units::duration")]
    pub tcp_keepalive: Duration,
    /// How long an idle client connection is kept between requests.
    #[serde(with = "units::duration")]
    pub keepalive_timeout: Duration,
    /// Requests served on one HTTP/1.1 connection before it is closed (0: no limit).
    pub keepalive_request_limit: u32,
    /// Concurrent streams per HTTP/2 connection.
    pub h2_max_concurrent_streams: u32,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            backlog: 8192,
            reuseport: false,
            tcp_keepalive: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(75),
            keepalive_request_limit: 0,
            h2_max_concurrent_streams: 1000,
        }
    }
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `broker`: where messages and their histories live (`memory://` or
/// `redis://`), and how much history each channel keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    pub url: String,
    /// The sentinels' own password (`redis+sentinel://`); a secret.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub sentinel_password: String,
    pub namespace: String,
    pub history: usize,
    #[serde(with = "units::duration")]
    pub history_ttl: Duration,
    /// Redis commands in flight per instance; past it, callers wait (up to
    /// the broker's response timeout) and then get a 503.
    pub max_pending: usize,
    /// Announcements waiting for the hub's delivery task, at most; past it
    /// the Redis broker reconnects and catches up, and a memory publish
    /// waits for room.
    pub delivery_queue: usize,
}

/// `publish`: who may call the publish API on `admin_listen`, and how
/// many Redis replicas must have a message before it is acknowledged.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublishConfig {
    /// Bearer token of the publish API; empty means no authentication.
    pub token: String,
    /// Allows an empty token on an admin listener that is not loopback.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_unauthenticated: bool,
    /// Redis replicas that must have a message (`WAIT`) before its
    /// publish answers 200; 0: the master alone.
    pub replicas: usize,
    /// How long a publish waits for `replicas`, then answers 503
    /// `not_replicated`.
    #[serde(with = "units::duration")]
    pub replica_timeout: Duration,
}

impl Default for PublishConfig {
    fn default() -> Self {
        PublishConfig {
            token: String::new(),
            allow_unauthenticated: false,
            replicas: 0,
            replica_timeout: Duration::from_secs(1),
        }
    }
}

/// `limits`: the bounds on held polls, bodies, heads and channels.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_held: usize,
    #[serde(with = "units::size")]
    pub max_body: u64,
    pub max_channels: usize,
    /// Largest request head on the client listener (431 past it).
    #[serde(with = "units::size")]
    pub max_head: u64,
    /// Time for a whole request head to arrive (slowloris).
    #[serde(with = "units::duration")]
    pub header_timeout: Duration,
    /// Time a client may accept no bytes of an answer before it is dropped.
    #[serde(with = "units::duration")]
    pub write_timeout: Duration,
    /// Channels this instance keeps active (503 past it).
    pub max_active_channels: usize,
    /// Channels whose history the memory broker keeps (those created by
    /// publishing included): past it, the least recently published one
    /// without held polls is evicted; a publish to a new channel when every
    /// kept one has held polls gets a 503.
    pub max_channels_kept: usize,
    /// Requests held at once per client address: polls, SSE streams, watch
    /// requests (429 past it; 0: no limit).
    pub max_held_per_client: usize,
    /// New subscribe and watch requests per second per client address, a
    /// token bucket (429 past it; 0: no limit).
    pub polls_per_client: u32,
}

/// `cors`: the origins whose pages may subscribe from a browser.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cors {
    pub allow_origins: Vec<String>,
}

/// One entry of `upstreams`: a backend's addresses and timeouts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub addrs: Vec<String>,
    #[serde(default)]
    pub tls: bool,
    /// TLS server name; defaults to the address's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(default = "default_connect_timeout", with = "units::duration")]
    pub connect_timeout: Duration,
    #[serde(default = "default_read_timeout", with = "units::duration")]
    pub read_timeout: Duration,
    /// The active check of each address (see [`HealthCheckConfig`]). Absent
    /// when not written; [`Config::parse`] fills it in (from
    /// `health_check_interval` or the defaults) unless both are written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckConfig>,
    /// The old spelling of `health_check: {interval: ...}` (a TCP check),
    /// still read; giving both is refused by [`Config::validate`].
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "units::optional_duration"
    )]
    pub health_check_interval: Option<Duration>,
}

impl UpstreamConfig {
    /// The health check in force: `health_check`, else one every
    /// `health_check_interval` (TCP), else the default.
    pub fn health_check(&self) -> HealthCheckConfig {
        match (&self.health_check, self.health_check_interval) {
            (Some(check), _) => check.clone(),
            (None, Some(interval)) => HealthCheckConfig {
                interval,
                path: None,
            },
            (None, None) => HealthCheckConfig::default(),
        }
    }
}

/// `upstreams.<name>.health_check`: how each address is checked, from start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Time between two checks (`0s`: none; failed connections of requests
    /// still set an address aside).
    #[serde(default = "default_health_check_interval", with = "units::duration")]
    pub interval: Duration,
    /// When set, the check is a GET of this path that passes on a 2xx;
    /// otherwise a TCP connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            interval: default_health_check_interval(),
            path: None,
        }
    }
}

/// One entry of `routes`: a path, its methods, and what is done with a
/// request that matches (subscribe, watch, or proxy and publish).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<SubscribeConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<PublishThroughConfig>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub publish_from_header: bool,
    /// A watch route: GETs held until the representation changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<WatchConfig>,
}

/// A route's `watch`: a GET whose backend answer is shared by every
/// client until the resource's channel announces a change.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchConfig {
    /// A message on any of these means "the resource may have changed".
    pub channels: Vec<String>,
    #[serde(default = "default_hold", with = "units::duration")]
    pub timeout: Duration,
    /// Asked before a request is held or answered, as for subscribe routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorize: Option<String>,
    #[serde(default, with = "units::duration")]
    pub authorize_cache: Duration,
    #[serde(default = "default_authorize_cache_size")]
    pub authorize_cache_size: u64,
    /// The client headers sent to the `authorize` upstream, the keys of its
    /// cache, and what watchers must share to share a fetch.
    #[serde(default = "default_credentials")]
    pub authorize_credentials: Vec<String>,
}

/// A route's `subscribe`: the channels a request long-polls, for how
/// long, from where, in which format, and who authorizes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeConfig {
    pub channels: Vec<String>,
    #[serde(default = "default_hold", with = "units::duration")]
    pub timeout: Duration,
    #[serde(default)]
    pub first: FirstConfig,
    #[serde(default)]
    pub format: FormatConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorize: Option<String>,
    #[serde(default, with = "units::duration")]
    pub authorize_cache: Duration,
    /// Entries of the route's authorization cache (least recently used go first).
    #[serde(default = "default_authorize_cache_size")]
    pub authorize_cache_size: u64,
    /// The client headers sent to the `authorize` upstream, and so the
    /// headers its cache is keyed on.
    #[serde(default = "default_credentials")]
    pub authorize_credentials: Vec<String>,
}

/// A subscribe route's `first`: where a poll without a cursor starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FirstConfig {
    #[default]
    Newest,
    Oldest,
}

/// A subscribe route's `format`: how answers carry their messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FormatConfig {
    #[default]
    Json,
    Raw,
}

/// A proxied route's `publish`: the channel a write the backend accepted
/// is published to, and what of it is published.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishThroughConfig {
    pub channel: String,
    #[serde(default)]
    pub body: BodySource,
}

/// What of a proxied write is published: the backend's answer (the
/// default), the request's body, or nothing (a change notice).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BodySource {
    #[default]
    Response,
    Request,
    /// An empty message: a change notice (for watch routes).
    None,
}

/// The longest hold of a subscribe or watch route (`timeout`): a day.
pub const MAX_HOLD: Duration = Duration::from_secs(24 * 3600);
/// The longest `listener.tcp_keepalive`: Linux's largest `TCP_KEEPIDLE`
/// (32767 s), past which the kernel refuses the option.
pub const MAX_TCP_KEEPALIVE: Duration = Duration::from_secs(32767);

fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_health_check_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_read_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_authorize_cache_size() -> u64 {
    10_000
}
fn default_credentials() -> Vec<String> {
    vec!["Authorization".into(), "Cookie".into()]
}
fn default_hold() -> Duration {
    Duration::from_secs(30)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".into(),
            tls: None,
            listener: ListenerConfig::default(),
            upgrade_sock: "/tmp/pollgate_upgrade.sock".into(),
            admin_listen: "127.0.0.1:9090".into(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            grace_period: Duration::from_secs(10),
            broker: BrokerConfig::default(),
            publish: PublishConfig::default(),
            limits: Limits::default(),
            trusted_proxies: Vec::new(),
            cors: Cors::default(),
            upstreams: BTreeMap::new(),
            routes: Vec::new(),
            webhooks: None,
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            url: "memory://".into(),
            sentinel_password: String::new(),
            namespace: "pollgate".into(),
            history: 100,
            history_ttl: Duration::from_secs(3600),
            max_pending: 10_000,
            delivery_queue: crate::hub::DELIVERY_QUEUE,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_held: 100_000,
            max_body: 1 << 20,
            max_channels: 16,
            max_head: 16 * 1024,
            header_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_active_channels: 100_000,
            // With the default history (100) and small messages (1 KiB),
            // at most about 1 GiB of histories: see docs/configuration.md.
            max_channels_kept: 10_000,
            // Off: see docs/security.md, "Fairness per client" (NAT, and
            // load balancers not yet named in trusted_proxies).
            max_held_per_client: 0,
            polls_per_client: 0,
        }
    }
}

/// Problems found in a config, each a full line ready to print:
/// `{file}: {key path}: {what is wrong}` (or `{file}: {what}` for the file
/// as a whole), in the order `pollgate check` prints them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// The config with every secret (the broker URL's password, the
    /// sentinels' password, the publish token) replaced by `***`, fit to
    /// print.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        c.broker.url = redact_url(&c.broker.url);
        if !c.broker.sentinel_password.is_empty() {
            c.broker.sentinel_password = "***".into();
        }
        if !c.publish.token.is_empty() {
            c.publish.token = "***".into();
        }
        if let Some(hooks) = c.webhooks.as_mut().filter(|h| !h.secret.is_empty()) {
            hooks.secret = "***".into();
        }
        c
    }
}
