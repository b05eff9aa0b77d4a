//! Checking a config: what parsing cannot ([`Config::validate`]: addresses,
//! bounds, the broker URL, the upstreams, the durations' limits), and what
//! serving it would expose ([`Config::open_admin`]). The routes are checked
//! where they are compiled (`RouteTable::compile`).

use super::{redact_url, Config, ConfigErrors, WebhooksConfig, MAX_HOLD, MAX_TCP_KEEPALIVE};
use crate::units;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Shortest and longest `webhooks.linger`.
const MIN_LINGER: Duration = Duration::from_millis(100);
const MAX_LINGER: Duration = Duration::from_secs(24 * 3600);

impl Config {
    /// Checks everything that parsing cannot, but the routes (see
    /// `RouteTable::compile`); returns every problem found, prefixed with
    /// `file`.
    pub fn validate(&self, file: &str) -> Result<(), ConfigErrors> {
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
                let e = e.0.replace(&self.broker.url, &redact_url(&self.broker.url));
                bad("broker.url", e);
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
        if let Some(hooks) = &self.webhooks {
            self.check_webhooks(hooks, &mut bad);
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
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(problems))
        }
    }

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
        if let Some(hooks) = &self.webhooks {
            all.push(("webhooks.linger".into(), hooks.linger, MAX_LINGER));
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

    /// The problems of `webhooks`, each given to `bad` with its key.
    fn check_webhooks(&self, hooks: &WebhooksConfig, bad: &mut impl FnMut(&str, String)) {
        if hooks.linger < MIN_LINGER {
            bad("webhooks.linger", "must be at least 100ms".into());
        }
        for (i, e) in hooks.events.iter().enumerate() {
            if hooks.events[..i].contains(e) {
                bad(
                    &format!("webhooks.events[{i}]"),
                    format!("'{}' is listed twice", e.name()),
                );
            }
        }
        let Some(upstream) = &hooks.upstream else {
            if !hooks.secret.is_empty() {
                bad(
                    "webhooks.secret",
                    "is set without webhooks.upstream, where events go".into(),
                );
            }
            return;
        };
        if !self.upstreams.contains_key(upstream) {
            bad(
                "webhooks.upstream",
                format!("no upstream named '{upstream}' in upstreams"),
            );
        }
        let origin_form = hooks.path.starts_with('/')
            && hooks.path.parse::<http::uri::PathAndQuery>().is_ok()
            && !hooks.path.contains('#');
        if !origin_form {
            bad(
                "webhooks.path",
                format!(
                    "'{}' is not a path like /pollgate/events",
                    hooks.path.escape_default()
                ),
            );
        }
        if hooks.secret.is_empty() {
            bad(
                "webhooks.secret",
                "is empty: every webhook request is signed with it (Pollgate-Signature); set e.g. \
                 secret: \"${POLLGATE_WEBHOOK_SECRET}\""
                    .into(),
            );
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_health_check_is_read_in_its_one_spelling() {
        use crate::config::HealthCheckConfig;
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
             - {path: /w, upstream: app, watch: {channels: [a]}}\n\
             webhooks: {linger: 1s}\n",
        )
        .unwrap();
        let fields = include_str!("mod.rs")
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
}
