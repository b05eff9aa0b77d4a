//! Routes: path templates with `{name}` segments, prefix routes, channel
//! templates and channel-name rules (docs/configuration.md, "Routes").
//!
//! A [`PathTemplate`] matches whole segments of a request path and captures
//! `{name}` segments; a template ending in `/` (or the single `/`) matches any
//! path under it. A [`ChannelTemplate`] renders a channel name from captures.

use crate::target::Target;
use compact_str::CompactString;
use smallvec::SmallVec;
use std::fmt;
use std::sync::Arc;

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 256;

/// Why a channel name is refused; `None` when it is valid.
pub fn channel_problem(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > MAX_CHANNEL_LEN {
        return Some(format!(
            "channel names are 1 to {MAX_CHANNEL_LEN} bytes, got {}",
            name.len()
        ));
    }
    disallowed(name).map(|c| {
        format!("'{c}' is not allowed in a channel name (allowed: A-Z a-z 0-9 _ . : @ / -)")
    })
}

/// The first character of `name` a channel name may not hold. Every
/// allowed character is ASCII, so a byte test finds it.
fn disallowed(name: &str) -> Option<char> {
    let allowed =
        |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'/' | b'-');
    let at = name.bytes().position(|b| !allowed(b))?;
    name[at..].chars().next()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// Borrowed by every match's [`Params`].
    Param(String),
}

/// A compiled route path.
#[derive(Debug, Clone)]
pub struct PathTemplate {
    segments: Vec<Segment>,
    prefix: bool,
}

/// Path parameters captured by a match, in path order, named by the
/// route's own strings (a route has a few: a list is cheaper than a map,
/// and two values of up to 24 bytes each are held without an allocation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params<'r>(SmallVec<[(&'r str, CompactString); 2]>);

impl<'r> Params<'r> {
    /// No parameters.
    pub fn new() -> Params<'r> {
        Params::default()
    }

    /// Sets parameter `name` (replacing an earlier value).
    pub fn insert(&mut self, name: &'r str, value: &str) {
        let value = CompactString::from(value);
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => *v = value,
            None => self.0.push((name, value)),
        }
    }

    /// The value of parameter `name`, if captured.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.value(name).map(CompactString::as_str)
    }

    fn value(&self, name: &str) -> Option<&CompactString> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

impl PathTemplate {
    /// Compiles `path`; the error says what is wrong with it.
    pub fn parse(path: &str) -> Result<PathTemplate, String> {
        let rest = path
            .strip_prefix('/')
            .ok_or_else(|| format!("'{path}' must start with '/'"))?;
        let prefix = path.ends_with('/');
        let body = rest.strip_suffix('/').unwrap_or(rest);
        let mut segments = Vec::new();
        if !body.is_empty() {
            for seg in body.split('/') {
                if seg.is_empty() {
                    return Err(format!("'{path}' has an empty segment"));
                }
                segments.push(match param_name(seg)? {
                    Some(name) => {
                        let name = name.to_string();
                        if segments.contains(&Segment::Param(name.clone())) {
                            return Err(format!("'{path}' names {{{name}}} twice"));
                        }
                        Segment::Param(name)
                    }
                    None => Segment::Literal(seg.to_string()),
                });
            }
        }
        Ok(PathTemplate { segments, prefix })
    }

    /// Names of the `{name}` segments.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Param(n) => Some(n.as_str()),
            Segment::Literal(_) => None,
        })
    }

    /// Matches the decoded segments of a request path (see
    /// [`Target`]). Returns the captures or None.
    pub fn matches<'s>(&self, path: impl Iterator<Item = &'s str>) -> Option<Params<'_>> {
        let mut parts = path;
        let mut params = Params::new();
        for seg in &self.segments {
            let part = parts.next()?;
            match seg {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return None,
                Segment::Param(name) => {
                    if part.is_empty() {
                        return None;
                    }
                    params.insert(name, part);
                }
            }
        }
        // Nothing left, or only the empty segment of a trailing slash.
        let exact = match parts.next() {
            None => true,
            Some(last) => last.is_empty() && parts.next().is_none(),
        };
        (exact || self.prefix).then_some(params)
    }
}

/// `{name}` → Some(name); a plain segment → None; a malformed one → Err.
fn param_name(seg: &str) -> Result<Option<String>, String> {
    match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
        Some(name)
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
        {
            Ok(Some(name.to_string()))
        }
        Some(_) => Err(format!(
            "'{seg}' is not a valid {{name}} (letters, digits, _)"
        )),
        None if seg.contains(['{', '}']) => {
            Err(format!("'{seg}': a {{name}} must be a whole segment"))
        }
        None => Ok(None),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Param(String),
}

/// A channel name with `{name}` placeholders, e.g. `room:{room}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelTemplate {
    pieces: Vec<Piece>,
}

impl ChannelTemplate {
    /// Compiles `text`, checking its literal parts and that every
    /// placeholder is one of `params`.
    pub fn parse<'a>(
        text: &str,
        params: impl IntoIterator<Item = &'a str> + Clone,
    ) -> Result<ChannelTemplate, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            let (lit, after) = rest.split_at(open);
            let close = after
                .find('}')
                .ok_or_else(|| format!("'{text}' has an unclosed '{{'"))?;
            let name = &after[1..close];
            if !params.clone().into_iter().any(|p| p == name) {
                return Err(format!(
                    "'{text}' uses {{{name}}}, which the route's path does not capture"
                ));
            }
            if !lit.is_empty() {
                pieces.push(Piece::Text(lit.to_string()));
            }
            pieces.push(Piece::Param(name.to_string()));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("'{text}' has a '}}' without '{{'"));
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        if pieces.is_empty() {
            return Err("a channel template cannot be empty".into());
        }
        for p in &pieces {
            if let Piece::Text(t) = p {
                if let Some(c) = disallowed(t) {
                    return Err(format!("'{text}': '{c}' is not allowed in a channel name"));
                }
            }
        }
        Ok(ChannelTemplate { pieces })
    }

    /// Renders the channel name for `params` (inline up to 24 bytes: a
    /// poll allocates nothing for it, as a rule); the error is a 400 detail.
    pub fn render(&self, params: &Params) -> Result<CompactString, String> {
        let out = match self.pieces.as_slice() {
            // The usual `{channel}`: the capture is the name.
            [Piece::Param(n)] => params.value(n).cloned().unwrap_or_default(),
            _ => self.concat(params),
        };
        match channel_problem(&out) {
            None => Ok(out),
            Some(why) => Err(format!("channel '{}': {why}", out.escape_default())),
        }
    }

    /// The pieces written out one after the other.
    fn concat(&self, params: &Params) -> CompactString {
        let piece = |p: &'_ Piece| match p {
            Piece::Text(t) => t.len(),
            Piece::Param(n) => params.get(n).map_or(0, str::len),
        };
        let mut out = CompactString::with_capacity(self.pieces.iter().map(piece).sum());
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Param(n) => out.push_str(params.get(n).unwrap_or("")),
            }
        }
        out
    }
}

impl fmt::Display for ChannelTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.pieces {
            match p {
                Piece::Text(t) => f.write_str(t)?,
                Piece::Param(n) => write!(f, "{{{n}}}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_match_whole_segments_and_prefixes() {
        fn m<'t>(t: &'t PathTemplate, path: &str) -> Option<Params<'t>> {
            t.matches(Target::parse(path).unwrap().segments())
        }
        let t = PathTemplate::parse("/rooms/{room}/events").unwrap();
        assert_eq!(m(&t, "/rooms/1/events").unwrap().get("room").unwrap(), "1");
        assert_eq!(
            m(&t, "/rooms/a%3Ab/events").unwrap().get("room").unwrap(),
            "a:b"
        );
        assert_eq!(
            m(&t, "/r%6Foms/1/events/").unwrap().get("room").unwrap(),
            "1"
        );
        assert_eq!(
            m(&t, "/rooms/a%2Fb/events").unwrap().get("room").unwrap(),
            "a/b"
        );
        assert!(m(&t, "/rooms/1/events/x").is_none());
        assert!(m(&t, "/rooms//events").is_none());
        assert!(m(&t, "/rooms/1").is_none());
        let p = PathTemplate::parse("/api/").unwrap();
        assert!(m(&p, "/api/x/y").is_some());
        assert!(m(&p, "/apix").is_none());
        assert!(m(&PathTemplate::parse("/").unwrap(), "/anything").is_some());
        assert!(PathTemplate::parse("rooms").is_err());
        assert!(PathTemplate::parse("/a/x{b}").is_err());
        assert!(PathTemplate::parse("/a/{b}/{b}").is_err());
    }

    #[test]
    fn channel_templates_render_and_validate() {
        let t = ChannelTemplate::parse("room:{room}", ["room"]).unwrap();
        let mut p = Params::new();
        p.insert("room", "42");
        assert_eq!(t.render(&p).unwrap(), "room:42");
        p.insert("room", "a b");
        assert!(t.render(&p).is_err());
        let whole = ChannelTemplate::parse("{room}", ["room"]).unwrap();
        assert!(whole.render(&p).is_err(), "a capture is checked as a name");
        p.insert("room", "r:1");
        assert_eq!(whole.render(&p).unwrap(), "r:1");
        assert!(whole.render(&Params::new()).is_err(), "no capture, no name");
        assert!(ChannelTemplate::parse("room:{nope}", ["room"]).is_err());
        assert!(ChannelTemplate::parse("bad channel", ["room"]).is_err());
        assert!(ChannelTemplate::parse("room:{room", ["room"]).is_err());
        assert!(channel_problem(&"x".repeat(257)).is_some());
        let why = channel_problem("caf\u{e9}").unwrap();
        assert!(why.starts_with("'\u{e9}' is not allowed"), "{why}");
        assert_eq!(channel_problem("a-Z_0.9:@/b"), None);
    }
}

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
    pub authorize: Option<String>,
    /// The route's remembered authorization decisions, when it caches them.
    pub authorize_cache: Option<Arc<crate::authorize::AuthCache>>,
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
    pub authorize: Option<String>,
    /// The route's remembered authorization decisions, when it caches them.
    pub authorize_cache: Option<Arc<crate::authorize::AuthCache>>,
}

/// A reverse-proxy route, optionally publishing what passes through.
#[derive(Debug, Clone)]
pub struct ProxyRoute {
    pub upstream: String,
    pub publish: Option<(ChannelTemplate, crate::config::BodySource)>,
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
    /// Compiles the config's routes; each problem names `routes[i]...`.
    pub fn compile(config: &crate::config::Config) -> Result<RouteTable, Vec<String>> {
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
            Err(problems)
        }
    }

    /// Finds the first route for `method` and the request `target`.
    pub fn find(&self, method: &str, target: &Target) -> Match<'_> {
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

/// The `authorize` upstream of a subscribe or watch route (`at` is its
/// key) and its decision cache (`authorize_cache` long, of
/// `authorize_cache_size` entries; none when 0s).
fn compile_authorize(
    at: &str,
    (upstream, ttl, size): (&Option<String>, std::time::Duration, u64),
    config: &crate::config::Config,
    problems: &mut Vec<String>,
) -> (Option<String>, Option<Arc<crate::authorize::AuthCache>>) {
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
    let cache = (upstream.is_some() && !ttl.is_zero())
        .then(|| Arc::new(crate::authorize::AuthCache::new(size, ttl)));
    (upstream.clone(), cache)
}

fn compile_route(
    config: &crate::config::Config,
    key: &str,
    rc: &crate::config::RouteConfig,
) -> Result<Route, Vec<String>> {
    use crate::config::{FirstConfig, FormatConfig};
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
            let (authorize, authorize_cache) = compile_authorize(
                &format!("{key}.subscribe"),
                (&s.authorize, s.authorize_cache, s.authorize_cache_size),
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
                authorize_cache,
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
            let (authorize, authorize_cache) = compile_authorize(
                &format!("{key}.watch"),
                (&w.authorize, w.authorize_cache, w.authorize_cache_size),
                config,
                &mut problems,
            );
            Some(Action::Watch(WatchRoute {
                upstream: up.clone(),
                channels,
                timeout: w.timeout,
                authorize,
                authorize_cache,
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
