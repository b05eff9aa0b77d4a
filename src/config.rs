//! The YAML configuration file (docs/configuration.md): its shape, defaults, `${VAR}`
//! expansion and validation.
//!
//! [`Config::load`] returns either a config every other module can trust or
//! the full list of problems, each naming the file, the key path and what is
//! wrong, which `pollgate check` prints one per line.

use crate::routes::RouteTable;
pub use crate::secret::redact_url;
use crate::units;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
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

/// Problems found in a config, each a full line ready to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Reads, expands, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("{file}: cannot read: {e}")]))?;
        Config::parse(&file, &text)
    }

    /// Parses YAML `text` (named `file` in errors) into a config, without
    /// validating it.
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigErrors> {
        let expanded = expand_env(text, |k| std::env::var(k).ok())
            .map_err(|e| ConfigErrors(vec![format!("{file}: {e}")]))?;
        if expanded.trim().is_empty() {
            return Ok(Config::default());
        }
        let de = serde_yaml::Deserializer::from_str(&expanded);
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            ConfigErrors(vec![if path == "." {
                format!("{file}: {inner}")
            } else {
                format!("{file}: {path}: {inner}")
            }])
        })?;
        // The health check in its one spelling, `health_check` (what `check`
        // prints); both spellings are left for `validate` to refuse.
        for up in config.upstreams.values_mut() {
            if up.health_check.is_none() {
                up.health_check = Some(up.health_check());
                up.health_check_interval = None;
            }
        }
        Ok(config)
    }

    /// Checks everything that parsing cannot; returns every problem found,
    /// prefixed with `file`.
    pub fn validate(&self, file: &str) -> Result<RouteTable, ConfigErrors> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, why: String| problems.push(format!("{file}: {key}: {why}"));
        let tls_listen = self.tls.as_ref().map(|t| t.listen.as_str());
        for (key, addr) in [
            ("listen", Some(self.listen.as_str())),
            ("tls.listen", tls_listen),
            ("admin_listen", Some(self.admin_listen.as_str())),
        ] {
            if let Some(addr) = addr.filter(|a| a.parse::<SocketAddr>().is_err()) {
                bad(key, format!("'{addr}' is not an address like 0.0.0.0:8080"));
            }
        }
        if let Some(tls) = &self.tls {
            for (key, path) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
                if let Err(e) = std::fs::metadata(path) {
                    bad(key, format!("cannot read '{path}': {e}"));
                }
            }
            if tls.handshake_timeout.is_zero() {
                bad("tls.handshake_timeout", "must be longer than 0s".into());
            }
        }
        // Each listener needs an address of its own: two on one port would
        // fail to bind, or with `listener.reuseport` share its connections.
        for (key, addr, other_key, other) in [
            (
                "admin_listen",
                Some(&self.admin_listen),
                "listen",
                &self.listen,
            ),
            (
                "tls.listen",
                self.tls.as_ref().map(|t| &t.listen),
                "listen",
                &self.listen,
            ),
            (
                "tls.listen",
                self.tls.as_ref().map(|t| &t.listen),
                "admin_listen",
                &self.admin_listen,
            ),
        ] {
            if addr.is_some_and(|a| clash(a, other)) {
                bad(
                    key,
                    format!(
                        "'{}' takes the port of {other_key} ('{other}'); each listener needs an \
                         address of its own",
                        addr.map_or("", |a| a.as_str())
                    ),
                );
            }
        }
        for (key, d, max) in self.durations() {
            if d > max {
                bad(
                    &key,
                    format!(
                        "{} is longer than {}, the most allowed",
                        whole(d),
                        whole(max)
                    ),
                );
            }
        }
        if self.listener.backlog == 0 {
            bad("listener.backlog", "must be at least 1".into());
        }
        if self.listener.keepalive_timeout < Duration::from_secs(1) {
            bad("listener.keepalive_timeout", "must be at least 1s".into());
        }
        if self.listener.h2_max_concurrent_streams == 0 {
            bad(
                "listener.h2_max_concurrent_streams",
                "must be at least 1".into(),
            );
        }
        if self.upgrade_sock.is_empty() {
            bad("upgrade_sock", "must be a path".into());
        }
        if self.threads == 0 {
            bad("threads", "must be at least 1".into());
        }
        let scheme = self.broker.url.split("://").next().unwrap_or("");
        if !self.broker.url.contains("://")
            || ![
                "memory",
                "redis",
                "rediss",
                "redis+cluster",
                "redis+sentinel",
                "rediss+sentinel",
            ]
            .contains(&scheme)
        {
            bad(
                "broker.url",
                format!(
                    "'{}' is not a memory://, redis://, rediss://, redis+cluster:// or \
                     redis+sentinel:// URL",
                    redact_url(&self.broker.url)
                ),
            );
        }
        if scheme.starts_with("redis") {
            if let Err(e) = crate::broker::redis::check_url(&self.broker.url) {
                let e = e.replace(&self.broker.url, &redact_url(&self.broker.url));
                bad(
                    "broker.url",
                    e.trim_start_matches("broker.url: ").to_string(),
                );
            }
        }
        if self.publish.replicas > 0 && !scheme.starts_with("redis") {
            bad(
                "publish.replicas",
                "needs a Redis broker (broker.url: redis://, redis+sentinel:// or \
                 redis+cluster://): the memory broker has no replicas"
                    .into(),
            );
        }
        if self.publish.replica_timeout.is_zero() {
            bad("publish.replica_timeout", "must be longer than 0s".into());
        }
        if !self.broker.sentinel_password.is_empty() && !scheme.ends_with("+sentinel") {
            bad(
                "broker.sentinel_password",
                "is only for a redis+sentinel:// broker.url".into(),
            );
        }
        if self.broker.history == 0 {
            bad("broker.history", "must be at least 1".into());
        }
        if self.broker.history_ttl.is_zero() {
            bad("broker.history_ttl", "must be longer than 0s".into());
        }
        if self.limits.max_held == 0 {
            bad("limits.max_held", "must be at least 1".into());
        }
        if self.limits.max_body == 0 {
            bad("limits.max_body", "must be at least 1 byte".into());
        }
        if self.limits.max_channels == 0 {
            bad("limits.max_channels", "must be at least 1".into());
        }
        if !(1024..=1 << 20).contains(&self.limits.max_head) {
            bad("limits.max_head", "must be between 1KiB and 1MiB".into());
        }
        for (key, d) in [
            ("limits.header_timeout", self.limits.header_timeout),
            ("limits.write_timeout", self.limits.write_timeout),
        ] {
            if d.is_zero() {
                bad(key, "must be longer than 0s".into());
            }
        }
        if self.limits.max_active_channels == 0 {
            bad("limits.max_active_channels", "must be at least 1".into());
        }
        if self.limits.max_channels_kept == 0 {
            bad("limits.max_channels_kept", "must be at least 1".into());
        }
        for (i, p) in self.trusted_proxies.iter().enumerate() {
            if crate::fairness::parse_cidr(p).is_none() {
                bad(
                    &format!("trusted_proxies[{i}]"),
                    format!(
                        "'{p}' is not a CIDR like 10.0.0.0/8 or 2001:db8::/32, nor an IP address"
                    ),
                );
            }
        }
        if self.broker.max_pending == 0 {
            bad("broker.max_pending", "must be at least 1".into());
        }
        if self.broker.delivery_queue == 0 {
            bad("broker.delivery_queue", "must be at least 1".into());
        }
        if let Some(why) = self.open_admin() {
            bad("publish.token", why);
        }
        for (i, o) in self.cors.allow_origins.iter().enumerate() {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                bad(
                    &format!("cors.allow_origins[{i}]"),
                    format!("'{o}' is not \"*\" nor an origin like https://app.example.com"),
                );
            }
        }
        for (name, up) in &self.upstreams {
            if up.addrs.is_empty() {
                bad(
                    &format!("upstreams.{name}.addrs"),
                    "needs at least one address".into(),
                );
            }
            for (i, a) in up.addrs.iter().enumerate() {
                let ok = a
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
                if !ok {
                    bad(
                        &format!("upstreams.{name}.addrs[{i}]"),
                        format!("'{a}' is not host:port"),
                    );
                }
            }
            if up.health_check.is_some() && up.health_check_interval.is_some() {
                bad(
                    &format!("upstreams.{name}.health_check_interval"),
                    format!(
                        "cannot be given with upstreams.{name}.health_check (it is the old \
                         spelling of health_check.interval); keep one of them"
                    ),
                );
            }
            let path = up.health_check.as_ref().and_then(|c| c.path.as_deref());
            if let Some(path) = path.filter(|p| !is_origin_path(p)) {
                bad(
                    &format!("upstreams.{name}.health_check.path"),
                    format!("'{path}' is not a path like /healthz"),
                );
            }
        }
        let table = RouteTable::compile(self);
        match table {
            Ok(t) if problems.is_empty() => Ok(t),
            Ok(_) => Err(ConfigErrors(problems)),
            Err(route_problems) => {
                problems.extend(route_problems.into_iter().map(|p| format!("{file}: {p}")));
                Err(ConfigErrors(problems))
            }
        }
    }
}

impl Config {
    /// Every duration of the config: its key path, its value and the
    /// longest it may be ([`MAX_HOLD`] for hold timeouts,
    /// [`MAX_TCP_KEEPALIVE`], [`units::duration::MAX`] for the others).
    pub fn durations(&self) -> Vec<(String, Duration, Duration)> {
        let max = units::duration::MAX;
        let mut all = vec![
            ("grace_period".to_string(), self.grace_period, max),
            (
                "listener.tcp_keepalive".into(),
                self.listener.tcp_keepalive,
                MAX_TCP_KEEPALIVE,
            ),
            (
                "listener.keepalive_timeout".into(),
                self.listener.keepalive_timeout,
                max,
            ),
            ("broker.history_ttl".into(), self.broker.history_ttl, max),
            (
                "publish.replica_timeout".into(),
                self.publish.replica_timeout,
                max,
            ),
            (
                "limits.header_timeout".into(),
                self.limits.header_timeout,
                max,
            ),
            (
                "limits.write_timeout".into(),
                self.limits.write_timeout,
                max,
            ),
        ];
        if let Some(tls) = &self.tls {
            all.push(("tls.handshake_timeout".into(), tls.handshake_timeout, max));
        }
        for (name, up) in &self.upstreams {
            let check = match (&up.health_check, up.health_check_interval) {
                (None, Some(interval)) => ("health_check_interval", interval),
                _ => ("health_check.interval", up.health_check().interval),
            };
            for (key, d) in [
                ("connect_timeout", up.connect_timeout),
                ("read_timeout", up.read_timeout),
                check,
            ] {
                all.push((format!("upstreams.{name}.{key}"), d, max));
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            let held = [
                r.subscribe
                    .as_ref()
                    .map(|s| ("subscribe", s.timeout, s.authorize_cache)),
                r.watch
                    .as_ref()
                    .map(|w| ("watch", w.timeout, w.authorize_cache)),
            ];
            for (kind, timeout, cache) in held.into_iter().flatten() {
                all.push((format!("routes[{i}].{kind}.timeout"), timeout, MAX_HOLD));
                all.push((format!("routes[{i}].{kind}.authorize_cache"), cache, max));
            }
        }
        all
    }

    /// Why serving this config would leave the publish API open to the
    /// network: an empty token on an admin listener that is not loopback,
    /// without `publish.allow_unauthenticated`. None when it is safe.
    pub fn open_admin(&self) -> Option<String> {
        let addr: SocketAddr = self.admin_listen.parse().ok()?;
        if !self.publish.token.is_empty()
            || self.publish.allow_unauthenticated
            || addr.ip().is_loopback()
        {
            return None;
        }
        Some(format!(
            "is empty while admin_listen ({}) is not a loopback address: anyone who reaches it \
             could publish; set a token (e.g. token: \"${{POLLGATE_PUBLISH_TOKEN}}\") or \
             publish.allow_unauthenticated: true",
            self.admin_listen
        ))
    }

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
        c
    }
}

/// Whether listening on `a` and on `b` would take the same socket: the
/// same port (not 0), on the same IP or where one of them is a wildcard
/// that covers the other (`0.0.0.0` covers IPv4, `[::]` both families).
/// False when either is not an address.
fn clash(a: &str, b: &str) -> bool {
    let (Ok(a), Ok(b)) = (a.parse::<SocketAddr>(), b.parse::<SocketAddr>()) else {
        return false;
    };
    let covers = |w: IpAddr, o: IpAddr| w.is_unspecified() && (w.is_ipv6() || o.is_ipv4());
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || covers(a.ip(), b.ip()) || covers(b.ip(), a.ip()))
}

/// Whether `path` can be sent as an origin-form request target (`/` first,
/// then a path and query `http` accepts).
fn is_origin_path(path: &str) -> bool {
    path.starts_with('/') && http::uri::PathAndQuery::try_from(path).is_ok()
}

/// `d` as whole days (`365d`) or whole seconds (`32767s`) when it is one,
/// else in humantime's form (which counts months of 30.44 days).
fn whole(d: Duration) -> String {
    match (d.as_secs(), d.subsec_nanos()) {
        (s, 0) if s % 86_400 == 0 && s > 0 => format!("{}d", s / 86_400),
        (s, 0) => format!("{s}s"),
        _ => humantime::format_duration(d).to_string(),
    }
}

/// Expands `${VAR}` and `${VAR:-default}` with `lookup`. An unset variable
/// without a default is an error naming it.
pub fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed '${{' in '{}'", after.lines().next().unwrap_or("")))?;
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("'${{{expr}}}' is not a valid variable reference"));
        }
        match (lookup(name), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} is not set (write ${{{name}:-}} to allow it empty)"
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_expansion() {
        let env = |k: &str| (k == "A").then(|| "1".to_string());
        assert_eq!(expand_env("x${A}y${B:-z}", env).unwrap(), "x1yz");
        assert_eq!(expand_env("${B:-}", env).unwrap(), "");
        assert!(expand_env("${B}", env)
            .unwrap_err()
            .contains("B is not set"));
        assert!(expand_env("${A", env).is_err());
    }

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact_url("rediss://u:p@s/s@h/0"), "rediss://u:***@h/0");
        assert_eq!(redact_url("redis://pw@h"), "redis://***@h");
        assert_eq!(
            redact_url("redis+cluster://:pw@a:1,b:2"),
            "redis+cluster://:***@a:1,b:2"
        );
        assert_eq!(redact_url("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(redact_url("memory://"), "memory://");
        let mut c = Config::default();
        c.broker.url = "redis://:hunter2@h/0".into();
        c.publish.token = "s3cret".into();
        c.broker.sentinel_password = "sentinel-pw".into();
        let shown = serde_yaml::to_string(&c.redacted()).unwrap();
        assert!(shown.contains("sentinel_password: '***'"), "{shown}");
        assert!(!shown.contains("sentinel-pw"), "{shown}");
        c.broker.sentinel_password.clear();
        let shown = serde_yaml::to_string(&c.redacted()).unwrap();
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
        c.broker.url = "redis://:hunter2@h:99999/0".into();
        let e = c.validate("f.yaml").unwrap_err().to_string();
        assert!(e.contains("broker.url") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn an_open_admin_listener_is_refused() {
        let mut c = Config::default();
        assert!(c.open_admin().is_none(), "loopback without token is fine");
        c.admin_listen = "0.0.0.0:9090".into();
        let e = c.validate("f.yaml").unwrap_err().to_string();
        assert!(
            e.contains("f.yaml: publish.token: is empty while admin_listen"),
            "{e}"
        );
        c.publish.allow_unauthenticated = true;
        assert!(c.validate("f.yaml").is_ok());
        c.publish.allow_unauthenticated = false;
        c.publish.token = "t".into();
        assert!(c.validate("f.yaml").is_ok());
    }

    #[test]
    fn watch_routes_are_checked() {
        let route = |extra: &str| {
            format!(
                "upstreams:\n  app:\n    addrs: [\"127.0.0.1:1\"]\nroutes:\n  - path: \"/o/{{id}}\"\n    \
                 upstream: app\n{extra}"
            )
        };
        let errors = |extra: &str| {
            let c = Config::parse("f.yaml", &route(extra)).unwrap();
            c.validate("f.yaml").map(|_| ()).unwrap_err().to_string()
        };
        let watch = "    watch:\n      channels: [\"o:{id}\"]\n";
        let ok = Config::parse("f.yaml", &route(watch)).unwrap();
        assert!(ok.validate("f.yaml").is_ok());
        let e = errors(&format!("{watch}    methods: [POST]\n"));
        assert!(
            e.contains("routes[0].methods: a watch route serves GET, not POST"),
            "{e}"
        );
        let e = errors(&format!(
            "{watch}    publish:\n      channel: \"o:{{id}}\"\n"
        ));
        assert!(e.contains("a watch route does not publish"), "{e}");
        let e = errors("    watch:\n      channels: []\n");
        assert!(
            e.contains("routes[0].watch.channels: needs at least one channel"),
            "{e}"
        );
        let e = errors("    watch:\n      channels: [\"o:{nope}\"]\n");
        assert!(e.contains("routes[0].watch.channels[0]"), "{e}");
        let e = errors(&format!("{watch}      authorize: nowhere\n"));
        assert!(
            e.contains("routes[0].watch.authorize: no upstream named 'nowhere'"),
            "{e}"
        );
        let none =
            "    methods: [PUT]\n    publish:\n      channel: \"o:{id}\"\n      body: none\n";
        assert!(Config::parse("f.yaml", &route(none))
            .unwrap()
            .validate("f.yaml")
            .is_ok());
    }

    #[test]
    fn listeners_that_would_share_a_socket_clash() {
        assert!(clash("127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(clash("0.0.0.0:8080", "127.0.0.1:8080"));
        assert!(clash("127.0.0.1:8080", "[::]:8080"));
        assert!(clash("[::1]:8080", "[::]:8080"));
        assert!(!clash("0.0.0.0:8080", "[::1]:8080"));
        assert!(!clash("127.0.0.1:8080", "127.0.0.2:8080"));
        assert!(!clash("127.0.0.1:8080", "127.0.0.1:9090"));
        assert!(!clash("127.0.0.1:0", "127.0.0.1:0"));
        assert!(!clash("nowhere", "nowhere"));
    }

    #[test]
    fn every_duration_key_is_bounded() {
        // One of each block that holds durations: `durations()` must name
        // every field read with `units::duration`.
        let c = Config::parse(
            "f.yaml",
            "tls: {listen: \"127.0.0.1:8443\", cert: c, key: k}\n\
             upstreams: {app: {addrs: [\"127.0.0.1:1\"]}}\n\
             routes:\n\
             - {path: /s, subscribe: {channels: [a]}}\n\
             - {path: /w, upstream: app, watch: {channels: [a]}}\n",
        )
        .unwrap();
        let fields = include_str!("config.rs")
            .matches(concat!("with = \"units::", "duration\""))
            .count();
        let keys = c.durations();
        assert_eq!(keys.len(), fields, "{keys:?}");
        assert!(keys
            .iter()
            .all(|(_, d, max)| d <= max && *max <= units::duration::MAX));
        let mut c = c;
        c.grace_period = units::duration::MAX + Duration::from_secs(1);
        c.routes[0].subscribe.as_mut().unwrap().timeout = MAX_HOLD + Duration::from_secs(1);
        let e = c.validate("f.yaml").unwrap_err().to_string();
        assert!(
            e.contains("f.yaml: grace_period: 31536001s is longer than 365d, the most allowed"),
            "{e}"
        );
        assert!(
            e.contains("f.yaml: routes[0].subscribe.timeout: 86401s is longer than 1d"),
            "{e}"
        );
    }

    #[test]
    fn per_client_limits_and_trusted_proxies_are_read_and_checked() {
        let c = Config::parse(
            "f.yaml",
            "limits: {max_held_per_client: 10, polls_per_client: 5}\n\
             trusted_proxies: [\"10.0.0.0/8\", \"2001:db8::/32\", \"192.0.2.1\"]\n",
        )
        .unwrap();
        assert_eq!(c.limits.max_held_per_client, 10);
        assert_eq!(c.limits.polls_per_client, 5);
        assert!(c.validate("f.yaml").is_ok());
        let d = Config::default();
        assert_eq!(
            (d.limits.max_held_per_client, d.limits.polls_per_client),
            (0, 0)
        );
        assert!(d.trusted_proxies.is_empty());
        let c = Config::parse(
            "f.yaml",
            "trusted_proxies: [\"10.0.0.0/8\", \"10.0.0.0/33\", lb]\n",
        )
        .unwrap();
        let e = c.validate("f.yaml").unwrap_err();
        assert_eq!(e.0.len(), 2, "{e}");
        assert!(
            e.0[0].starts_with("f.yaml: trusted_proxies[1]: '10.0.0.0/33' is not a CIDR"),
            "{e}"
        );
        assert!(
            e.0[1].starts_with("f.yaml: trusted_proxies[2]: 'lb'"),
            "{e}"
        );
    }

    #[test]
    fn the_health_check_is_read_in_its_one_spelling() {
        let up = |yaml: &str| {
            let text = format!("upstreams:\n  app:\n    addrs: [\"127.0.0.1:1\"]\n{yaml}");
            let c = Config::parse("f.yaml", &text).unwrap();
            c.validate("f.yaml").unwrap();
            c.upstreams["app"].clone()
        };
        let five = Duration::from_secs(5);
        let default = up("");
        assert_eq!(default.health_check, Some(HealthCheckConfig::default()));
        assert_eq!(
            (default.health_check().interval, default.health_check().path),
            (five, None)
        );
        let old = up("    health_check_interval: 0s\n");
        assert_eq!(old.health_check_interval, None);
        assert_eq!(old.health_check().interval, Duration::ZERO);
        let new = up("    health_check: {path: /healthz?deep=1}\n");
        assert_eq!(new.health_check().interval, five);
        assert_eq!(new.health_check().path.as_deref(), Some("/healthz?deep=1"));
    }

    #[test]
    fn unknown_keys_name_their_path() {
        let e = Config::parse("f.yaml", "limits:\n  max_hled: 3\n").unwrap_err();
        assert!(e.0[0].starts_with("f.yaml: limits"), "{e}");
        assert!(e.0[0].contains("max_hled"), "{e}");
        let e = Config::parse("f.yaml", "grace_period: soon\n").unwrap_err();
        assert!(
            e.0[0].contains("grace_period") && e.0[0].contains("invalid duration"),
            "{e}"
        );
    }
}
