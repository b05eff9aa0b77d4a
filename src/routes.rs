//! Routes: the compiled route table (config → request matching). Each route
//! pairs a [`PathTemplate`] and its methods with what it does: subscribe,
//! watch, or proxy (and maybe publish) — docs/configuration.md, "Routes".
//! [`RouteTable::compile`] builds it from a config's `routes` (templates,
//! authorization caches), checking each route as it goes; [`RouteTable::find`]
//! picks the first route whose template and method match a request.

use crate::authorize::{AuthCache, Authorize, Credentials};
use crate::config::{BodySource, Config, ConfigErrors, FirstConfig, FormatConfig, RouteConfig};
use crate::target::RequestTarget;
use crate::template::{ChannelTemplate, Params, PathTemplate};
use std::sync::Arc;

/// A compiled route (config → request matching).
#[derive(Debug, Clone)]
pub struct Route {
    pub path: PathTemplate,
    /// Upper-case methods; empty = any.
    pub methods: Vec<String>,
    pub action: Action,
}

/// What a route does with a request.
#[derive(Debug, Clone)]
pub enum Action {
    Subscribe(SubscribeRoute),
    Proxy(ProxyRoute),
    /// Proxied like [`Action::Proxy`]; a GET is served by the watcher.
    Watch(WatchRoute),
}

/// A long-poll route.
#[derive(Debug, Clone)]
pub struct SubscribeRoute {
    pub channels: Vec<ChannelTemplate>,
    pub timeout: std::time::Duration,
    pub first: crate::hub::First,
    pub raw: bool,
    /// Who is asked before a poll is held, when someone is.
    pub authorize: Option<Authorize>,
}

impl Action {
    /// The upstream the route's requests are proxied to (None for a
    /// subscribe route).
    pub fn upstream(&self) -> Option<&str> {
        match self {
            Action::Proxy(p) => Some(&p.upstream),
            Action::Watch(w) => Some(&w.upstream),
            Action::Subscribe(_) => None,
        }
    }
}

/// A watch route: GETs proxied to `upstream`, held while unchanged.
#[derive(Debug, Clone)]
pub struct WatchRoute {
    pub upstream: String,
    pub channels: Vec<ChannelTemplate>,
    pub timeout: std::time::Duration,
    /// Asked before holding, as for subscribe routes.
    pub authorize: Option<Authorize>,
    /// What watchers must present alike to share a fetch (besides
    /// `Accept*` and the upstream's `Vary`): `authorize_credentials`.
    pub credentials: Credentials,
}

/// A reverse-proxy route, optionally publishing what passes through.
#[derive(Debug, Clone)]
pub struct ProxyRoute {
    pub upstream: String,
    pub publish: Option<(ChannelTemplate, BodySource)>,
    pub publish_from_header: bool,
}

/// The routes of a config, first match wins.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

/// The result of matching a request.
pub enum Match<'a> {
    Found(&'a Route, Params<'a>),
    /// Some route has this path but none this method; the allowed methods.
    MethodNotAllowed(Vec<String>),
    NotFound,
}

impl RouteTable {
    /// Compiles the routes of `config` (named `file` in problems). Every
    /// problem of every route is returned, each a line `{file}:
    /// routes[i]...: why` as `pollgate check` prints it. `config` need not
    /// have passed [`Config::validate`] (`cli::check` runs both, to list
    /// every problem), but a gateway serves only the table of one that did.
    pub fn compile(config: &Config, file: &str) -> Result<RouteTable, ConfigErrors> {
        let mut problems = Vec::new();
        let mut routes = Vec::new();
        for (i, rc) in config.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            match compile_route(config, &key, rc) {
                Ok(r) => routes.push(r),
                Err(mut p) => problems.append(&mut p),
            }
        }
        if problems.is_empty() {
            Ok(RouteTable { routes })
        } else {
            let lines = problems.into_iter().map(|p| format!("{file}: {p}"));
            Err(ConfigErrors(lines.collect()))
        }
    }

    /// The route at `index` (as [`RouteTable::index_of`] gave it).
    pub fn at(&self, index: usize) -> &Route {
        &self.routes[index]
    }

    /// Where the route whose subscribe action is `sub` is in the table
    /// (`sub` is one of this table's).
    pub fn index_of(&self, sub: &SubscribeRoute) -> usize {
        let is_it = |r: &Route| matches!(&r.action, Action::Subscribe(s) if std::ptr::eq(s, sub));
        self.routes
            .iter()
            .position(is_it)
            .expect("a route of this table")
    }

    /// Finds the first route for `method` and the request `target`.
    pub fn find(&self, method: &str, target: &RequestTarget) -> Match<'_> {
        let mut allowed: Vec<String> = Vec::new();
        for r in &self.routes {
            if let Some(params) = r.path.matches(target.segments()) {
                if r.methods.is_empty() || r.methods.iter().any(|m| m == method) {
                    return Match::Found(r, params);
                }
                allowed.extend(r.methods.iter().cloned());
            }
        }
        if allowed.is_empty() {
            Match::NotFound
        } else {
            allowed.dedup();
            Match::MethodNotAllowed(allowed)
        }
    }
}

/// The channel templates and hold timeout of a subscribe or watch route
/// (`at` is its key, e.g. `routes[0].watch`), over the path's `params`;
/// what is wrong goes to `problems`.
fn compile_channels(
    at: &str,
    (names, timeout): (&[String], std::time::Duration),
    params: &[&str],
    max_channels: usize,
    problems: &mut Vec<String>,
) -> Vec<ChannelTemplate> {
    if names.is_empty() {
        problems.push(format!("{at}.channels: needs at least one channel"));
    }
    if names.len() > max_channels {
        problems.push(format!(
            "{at}.channels: {} channels, more than limits.max_channels ({max_channels})",
            names.len()
        ));
    }
    let mut channels = Vec::new();
    for (j, c) in names.iter().enumerate() {
        match ChannelTemplate::parse(c, params.iter().copied()) {
            Ok(t) => channels.push(t),
            Err(e) => problems.push(format!("{at}.channels[{j}]: {e}")),
        }
    }
    if timeout.is_zero() {
        problems.push(format!("{at}.timeout: must be longer than 0s"));
    }
    channels
}

/// The `authorize` of a subscribe or watch route (`at` is its key): the
/// upstream, its decision cache (`authorize_cache` long, of
/// `authorize_cache_size` entries; none when 0s) and the credentials
/// (`authorize_credentials`), which are also returned alone.
fn compile_authorize(
    at: &str,
    (upstream, ttl, size, names): (&Option<String>, std::time::Duration, u64, &[String]),
    config: &Config,
    problems: &mut Vec<String>,
) -> (Option<Authorize>, Credentials) {
    if let Some(name) = upstream {
        if !config.upstreams.contains_key(name) {
            problems.push(format!(
                "{at}.authorize: no upstream named '{name}' in upstreams"
            ));
        }
    }
    if size == 0 {
        problems.push(format!("{at}.authorize_cache_size: must be at least 1"));
    }
    let credentials = Credentials::parse(names).unwrap_or_else(|why| {
        problems.push(format!("{at}.authorize_credentials: {why}"));
        Credentials::default()
    });
    let authorize = upstream.as_ref().map(|upstream| Authorize {
        upstream: upstream.clone(),
        cache: (!ttl.is_zero()).then(|| Arc::new(AuthCache::new(size, ttl))),
        credentials: credentials.clone(),
    });
    (authorize, credentials)
}

fn compile_route(config: &Config, key: &str, rc: &RouteConfig) -> Result<Route, Vec<String>> {
    let mut problems = Vec::new();
    let path = PathTemplate::parse(&rc.path).map_err(|e| vec![format!("{key}.path: {e}")])?;
    let params: Vec<&str> = path.params().collect();
    let mut methods = Vec::new();
    for (j, m) in rc.methods.iter().enumerate() {
        let up = m.to_ascii_uppercase();
        if up.is_empty() || !up.bytes().all(|b| b.is_ascii_uppercase()) {
            problems.push(format!("{key}.methods[{j}]: '{m}' is not an HTTP method"));
        }
        methods.push(up);
    }
    let upstream_known = |field: &str, name: &str, problems: &mut Vec<String>| {
        if !config.upstreams.contains_key(name) {
            problems.push(format!(
                "{key}.{field}: no upstream named '{name}' in upstreams"
            ));
        }
    };
    let action = match (&rc.subscribe, &rc.upstream) {
        (Some(_), Some(_)) | (None, None) => {
            problems.push(format!(
                "{key}: needs exactly one of 'subscribe' or 'upstream'"
            ));
            None
        }
        (Some(s), None) => {
            if rc.watch.is_some() {
                problems.push(format!(
                    "{key}: 'watch' belongs on an upstream route, not a subscribe route"
                ));
            }
            if rc.publish.is_some() || rc.publish_from_header {
                problems.push(format!(
                    "{key}: 'publish' belongs on an upstream route, not a subscribe route"
                ));
            }
            let channels = compile_channels(
                &format!("{key}.subscribe"),
                (&s.channels, s.timeout),
                &params,
                config.limits.max_channels,
                &mut problems,
            );
            let (authorize, _) = compile_authorize(
                &format!("{key}.subscribe"),
                (
                    &s.authorize,
                    s.authorize_cache,
                    s.authorize_cache_size,
                    &s.authorize_credentials,
                ),
                config,
                &mut problems,
            );
            Some(Action::Subscribe(SubscribeRoute {
                channels,
                timeout: s.timeout,
                first: match s.first {
                    FirstConfig::Newest => crate::hub::First::Newest,
                    FirstConfig::Oldest => crate::hub::First::Oldest,
                },
                raw: s.format == FormatConfig::Raw,
                authorize,
            }))
        }
        (None, Some(up)) if rc.watch.is_some() => {
            upstream_known("upstream", up, &mut problems);
            let w = rc.watch.as_ref().expect("a watch route");
            if rc.publish.is_some() || rc.publish_from_header {
                problems.push(format!(
                    "{key}: a watch route does not publish; put 'publish' on the route of the writes"
                ));
            }
            if let Some(m) = methods
                .iter()
                .find(|m| !matches!(m.as_str(), "GET" | "HEAD"))
            {
                problems.push(format!("{key}.methods: a watch route serves GET, not {m}"));
            }
            let channels = compile_channels(
                &format!("{key}.watch"),
                (&w.channels, w.timeout),
                &params,
                config.limits.max_channels,
                &mut problems,
            );
            let (authorize, credentials) = compile_authorize(
                &format!("{key}.watch"),
                (
                    &w.authorize,
                    w.authorize_cache,
                    w.authorize_cache_size,
                    &w.authorize_credentials,
                ),
                config,
                &mut problems,
            );
            Some(Action::Watch(WatchRoute {
                upstream: up.clone(),
                channels,
                timeout: w.timeout,
                authorize,
                credentials,
            }))
        }
        (None, Some(up)) => {
            upstream_known("upstream", up, &mut problems);
            let publish = match &rc.publish {
                Some(p) => match ChannelTemplate::parse(&p.channel, params.iter().copied()) {
                    Ok(t) => Some((t, p.body)),
                    Err(e) => {
                        problems.push(format!("{key}.publish.channel: {e}"));
                        None
                    }
                },
                None => None,
            };
            Some(Action::Proxy(ProxyRoute {
                upstream: up.clone(),
                publish,
                publish_from_header: rc.publish_from_header,
            }))
        }
    };
    match action {
        Some(action) if problems.is_empty() => Ok(Route {
            path,
            methods,
            action,
        }),
        _ => Err(problems),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            RouteTable::compile(&c, "f.yaml")
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        let watch = "    watch:\n      channels: [\"o:{id}\"]\n";
        let checked = |yaml: &str| {
            let c = Config::parse("f.yaml", yaml).unwrap();
            c.validate("f.yaml").is_ok() && RouteTable::compile(&c, "f.yaml").is_ok()
        };
        assert!(checked(&route(watch)));
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
        assert!(checked(&route(none)));
    }
}
