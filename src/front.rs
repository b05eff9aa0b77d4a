//! The client listener's front door: the [`Http1App`] of client
//! connections ([`http1::serve`] reads and parses each head). Long-polls
//! are served on the raw connection ([`h1`]) or held on a Pingora session;
//! every other request goes to Pingora's proxy (the
//! [`Gateway`]). HTTP/2 streams come through
//! Pingora's HTTP/2 server ([`HttpServerApp`]).
//!
//! Why: a connection that enters Pingora's proxy carries its per-request
//! machinery (a ~13 KiB future, the proxy session, cache and module state)
//! for as long as the request lasts. A held poll lasts seconds to minutes,
//! and there are tens of thousands of them. So only a request that is not
//! held is handed (with the bytes already read) to the proxy.

use crate::error::RequestError;
use crate::gateway::Gateway;
use crate::h1;
use crate::http1::{self, Head, HeadLimits, Http1App, Plan, Raw, Settings};
use crate::lifecycle::Lifecycle;
use crate::poll::{cors_headers, Poller};
use crate::routes::{Action, Match, RouteTable, SubscribeRoute, WatchRoute};
use crate::subscription::{self, Channels, Request, SubscribeHead};
use crate::target::RequestTarget;
use crate::template::Params;
use crate::watch::Watcher;
use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::protocols::http::v2::server::H2Options;
use pingora::protocols::http::ServerSession;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

/// The app behind the client listener.
pub struct Front {
    pub proxy: Arc<HttpProxy<Gateway>>,
    pub routes: Arc<RouteTable>,
    pub poller: Poller,
    pub watcher: Watcher,
    pub life: Arc<Lifecycle>,
    pub limits: HeadLimits,
    /// Seconds an idle connection is kept between requests.
    pub keepalive_secs: u64,
    /// Concurrent streams per HTTP/2 connection.
    pub h2_max_streams: u32,
    /// HTTP/2 with prior knowledge is served on plaintext connections.
    pub options: HttpServerOptions,
}

/// What the front door holds a request on.
#[derive(Clone, Copy)]
pub enum Holds<'a> {
    Subscribe(&'a SubscribeRoute),
    Watch(&'a WatchRoute),
}

/// A long-poll planned for the lean path ([`h1::serve`]).
pub struct LeanPoll<'a> {
    req: Result<Request, RequestError>,
    route: &'a SubscribeRoute,
    manner: h1::Manner,
    /// The client its `X-Forwarded-For` names, should the peer be a
    /// trusted proxy (read only when that can matter).
    forwarded: Option<IpAddr>,
}

/// What a client connection keeps from one request to the next: the lean
/// path's (its direct writer, its share of the jitter) and its last lean
/// poll's route and channels.
#[derive(Default)]
pub struct Kept {
    lean: h1::Kept,
    last: Option<LastPoll>,
}

/// The route and channels of the connection's last lean poll, for its
/// path: a client polls the same path again and again (only its cursor
/// changes), and the same path (its bytes as sent, with the method GET)
/// matches the same route with the same captures, so the target's parse,
/// the route's search and the channels' rendering are done once per
/// connection instead of once per poll.
struct LastPoll {
    /// The target's path as sent (origin-form: before `?`); up to 24
    /// bytes inline, so that comparing it reads no other allocation.
    path: compact_str::CompactString,
    /// Where the route is in the route table.
    route: usize,
    channels: Channels,
}

/// Whether a subscribe request on `sub` (its head `head`, described by
/// `facts`) takes the lean path: a bare head, no `authorize:`, no SSE.
fn serves_lean(head: &Head, facts: &SubscribeHead, sub: &SubscribeRoute) -> bool {
    head.bare() && sub.authorize.is_none() && !facts.wants_sse()
}

/// The facts a subscribe request is parsed from (`query`: its target's).
fn subscribe_head<'h>(head: &'h Head<'_>, query: Option<&'h str>) -> SubscribeHead<'h> {
    SubscribeHead {
        query,
        last_event_id: head.last_event_id,
        if_none_match: head.if_none_match,
        accept: head.accept,
    }
}

impl Front {
    /// The route of this request when the front door holds it (a
    /// subscribe request, or a GET on a watch route).
    fn held_route(&self, method: &str, target: &RequestTarget) -> Option<(Holds<'_>, Params<'_>)> {
        if method == "OPTIONS" {
            return None; // CORS preflight: the gateway answers it
        }
        match self.routes.find(method, target) {
            Match::Found(route, params) => match &route.action {
                Action::Subscribe(sub) => Some((Holds::Subscribe(sub), params)),
                Action::Watch(watch) if method == "GET" => Some((Holds::Watch(watch), params)),
                Action::Watch(_) | Action::Proxy(_) => None,
            },
            _ => None,
        }
    }

    /// The subscribe route at `index` of the route table, when the request
    /// of `head` (described by `facts`) is served lean on it.
    fn lean_route(
        &self,
        head: &Head,
        facts: &SubscribeHead,
        index: usize,
    ) -> Option<&SubscribeRoute> {
        match &self.routes.at(index).action {
            Action::Subscribe(sub) if serves_lean(head, facts, sub) => Some(sub),
            _ => None,
        }
    }

    /// The lean path's work for the poll of `head` on `sub`, parsed as `req`.
    fn lean_poll<'a>(
        &'a self,
        head: &Head,
        last: bool,
        sub: &'a SubscribeRoute,
        req: Result<Request, RequestError>,
    ) -> LeanPoll<'a> {
        let clients = &self.poller.admission.clients;
        let forwarded = if clients.reads_forwarded() {
            let fields = head.forwarded_for.iter().copied();
            clients.trusted.forwarded(fields)
        } else {
            None
        };
        LeanPoll {
            forwarded,
            req,
            route: sub,
            manner: h1::Manner {
                keepalive: head.keepalive && !last && !self.life.is_draining(),
                cors: cors_headers(&self.poller.cors, head.origin),
            },
        }
    }

    /// Serves one HTTP/2 stream, whose request Pingora has read: a
    /// subscribe request here, anything else through the proxy (which
    /// refuses a bad target as the HTTP/1 path does).
    async fn serve_h2(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let req = session.req_header();
        if req.method == http::Method::CONNECT {
            // Pingora's proxy refuses it with a bare 405: the JSON one.
            // Boxed, as rare: its state would enlarge every held stream.
            return Box::pin(refuse_connect(session)).await;
        }
        let target = std::str::from_utf8(req.raw_path())
            .ok()
            .and_then(|raw| RequestTarget::parse(raw).ok());
        let method = req.method.as_str();
        // Taken apart before the hold, not kept beside it as the scrutinee
        // of a `match` would be.
        let Some(((route, params), target)) =
            target.and_then(|t| Some((self.held_route(method, &t)?, t)))
        else {
            return self.proxy.process_new_http(session, shutdown).await;
        };
        self.hold(session, target, route, params).await
    }

    /// Serves one long-poll or watch request on `session` (whose head is
    /// buffered).
    async fn hold(
        &self,
        mut session: ServerSession,
        target: RequestTarget,
        route: Holds<'_>,
        params: Params<'_>,
    ) -> Option<ReusedHttpStream> {
        let _in_flight = self.life.enter();
        match session.read_request().await {
            Ok(true) => {}
            _ => return None,
        }
        let draining = self.life.is_draining();
        session.set_keepalive(http1::keepalive(&session, self.keepalive_secs, draining));
        let served = match route {
            Holds::Subscribe(route) => {
                self.poller
                    .serve(&mut session, &target, route, &params)
                    .await
            }
            Holds::Watch(route) => {
                let request = (&target, route, &params);
                let watching = self.watcher.serve(&self.poller, &mut session, request);
                Box::pin(watching).await
            }
        };
        if served.is_err() {
            return None;
        }
        let persistent = HttpPersistentSettings::for_session(&session);
        // Boxed: finishing is a large future and would enlarge every held poll.
        match Box::pin(session.finish()).await {
            Ok(Some(stream)) => Some(ReusedHttpStream::from_reusable_stream(stream, persistent)),
            _ => None,
        }
    }
}

/// Answers a CONNECT (HTTP/2; on HTTP/1 its authority-form target is
/// refused by the front door) with the JSON 405: pollgate is no tunnel.
/// Returns None: the stream is done.
async fn refuse_connect(mut session: ServerSession) -> Option<ReusedHttpStream> {
    let e = RequestError::MethodNotAllowed {
        detail: "CONNECT is not proxied".into(),
        allow: "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS".into(),
    };
    if session.read_request().await.is_ok() {
        let _ = crate::error::refusal(&mut session, &e, &[]).await;
        let _ = session.finish_body().await;
    }
    None
}

impl Http1App for Front {
    type Lean<'a> = LeanPoll<'a>;
    type Handoff<'a> = (RequestTarget, Option<(Holds<'a>, Params<'a>)>);
    type Kept = Kept;

    /// The lean path takes a subscribe request whose head is bare, whose
    /// route has no `authorize:` and which does not ask for SSE; a Pingora
    /// session takes the rest (a held route, or the proxy). A target that
    /// does not parse is refused.
    fn plan<'a>(
        &'a self,
        head: Head<'_>,
        last: bool,
        kept: &mut Kept,
    ) -> Plan<LeanPoll<'a>, Self::Handoff<'a>> {
        let (path, query) = crate::target::split_query(head.target);
        let again = kept
            .last
            .as_ref()
            .filter(|l| head.method == "GET" && l.path == path);
        if let Some(again) = again {
            let facts = subscribe_head(&head, query);
            if let Some(sub) = self.lean_route(&head, &facts, again.route) {
                let req = facts.parse_on(sub, again.channels.clone());
                return Plan::Lean(self.lean_poll(&head, last, sub, req));
            }
        }
        let target = match RequestTarget::parse(head.target) {
            Ok(target) => target,
            Err(e) => return Plan::Refused(e.into()),
        };
        let route = self.held_route(head.method, &target);
        if let Some((Holds::Subscribe(sub), params)) = &route {
            let facts = subscribe_head(&head, target.query());
            if serves_lean(&head, &facts, sub) {
                let req = subscription::channels(sub, params).and_then(|channels| {
                    if head.method == "GET" && head.target.starts_with('/') {
                        kept.last = Some(LastPoll {
                            path: path.into(),
                            route: self.routes.index_of(sub),
                            channels: channels.clone(),
                        });
                    }
                    facts.parse_on(sub, channels)
                });
                return Plan::Lean(self.lean_poll(&head, last, sub, req));
            }
        }
        Plan::Session((target, route))
    }

    async fn serve_lean<'a>(
        &'a self,
        poll: &mut LeanPoll<'a>,
        raw: &mut Raw<'_>,
        kept: &mut Kept,
    ) -> bool {
        // Parsed: the poll keeps no read buffer while it is held.
        raw.release();
        let mut client = h1::Exchange::new(raw, &mut kept.lean);
        let poller = &self.poller;
        h1::serve(
            (&poller.admission, &poller.holder),
            &mut client,
            &poll.req,
            poll.route,
            &poll.manner,
            poll.forwarded,
        )
        .await
    }

    async fn serve_session<'a>(
        self: &'a Arc<Self>,
        session: ServerSession,
        (target, route): Self::Handoff<'a>,
        shutdown: &'a ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match route {
            // Boxed: an idle connection then carries only the head reader.
            Some((route, params)) => Box::pin(self.hold(session, target, route, params)).await,
            None => self.proxy.process_new_http(session, shutdown).await,
        }
    }
}

impl Front {
    /// What serves a connection or stream Pingora hands over: an HTTP/1
    /// connection's loop, or one HTTP/2 stream. Boxed, and chosen outside
    /// an async body, so that the caller's future keeps neither the
    /// session twice nor the other protocol's state.
    fn serving<'a>(
        self: &'a Arc<Self>,
        session: ServerSession,
        shutdown: &'a ShutdownWatch,
    ) -> Pin<Box<dyn Future<Output = Option<ReusedHttpStream>> + Send + 'a>> {
        match session {
            ServerSession::H1(h1) => {
                let serving = http1::serve(
                    self.clone(),
                    h1.into_inner(),
                    self.settings(0),
                    &self.life,
                    None,
                    shutdown,
                );
                Box::pin(async move {
                    serving.await;
                    None
                })
            }
            session => Box::pin(self.serve_h2(session, shutdown)),
        }
    }

    /// How this front door serves an HTTP/1 connection, with at most
    /// `request_limit` requests (0: no limit).
    pub fn settings(&self, request_limit: u32) -> Settings {
        Settings {
            limits: self.limits,
            keepalive_secs: self.keepalive_secs,
            request_limit,
            require_host: true,
        }
    }
}

#[async_trait]
impl HttpServerApp for Front {
    /// Serves one HTTP/2 stream (HTTP/1 connections are served by
    /// [`http1::serve`]).
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        self.serving(session, shutdown).await
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.options)
    }

    fn h2_options(&self) -> Option<H2Options> {
        let mut options = pingora::protocols::http::v2::server::default_h2_options();
        options.max_concurrent_streams(self.h2_max_streams);
        Some(options)
    }

    async fn http_cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}
