//! The client-facing listener: Pingora's `ProxyHttp` for pollgate.
//!
//! Long-polls never get here (the [`Front`](crate::front::Front) serves
//! them). `request_filter` matches the route: publishing proxy routes are
//! answered by the [`Relay`]; plain proxy routes continue through Pingora's
//! proxy, streaming both ways, to a peer of their upstream pool. Anything
//! else is a JSON 404 (or 405), and CORS preflights are answered here.

use crate::config::{Config, Cors};
use crate::error::RequestError;
use crate::hub::Hub;
use crate::lifecycle::{InFlight, Lifecycle};
use crate::metrics::Refusal;
use crate::poll::cors_headers;
use crate::relay::Relay;
use crate::respond;
use crate::routes::{Action, Match, RouteTable};
use crate::target::RequestTarget;
use crate::upstream::{add_forwarded, observe, strip_hop_by_hop, Peer, Pool, Upstreams};
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};
use std::sync::Arc;
use std::time::Instant;

/// The gateway service.
pub struct Gateway {
    routes: Arc<RouteTable>,
    cors: Cors,
    relay: Relay,
    upstreams: Arc<Upstreams>,
    life: Arc<Lifecycle>,
    max_body: u64,
    /// Seconds an idle client connection is kept open between requests.
    keepalive_secs: u64,
}

/// Per-request state.
pub struct Ctx {
    _in_flight: InFlight,
    /// The pool of a plain proxy route.
    pool: Option<Arc<Pool>>,
    /// The address index in use and how many were tried.
    peer_index: usize,
    tries: usize,
    upstream_started: Option<Instant>,
    observed: bool,
    body_seen: u64,
}

impl Gateway {
    /// A gateway serving `routes` of `config` from `hub`.
    pub fn new(
        config: &Config,
        routes: Arc<RouteTable>,
        upstreams: Arc<Upstreams>,
        hub: Arc<Hub>,
        life: Arc<Lifecycle>,
    ) -> Gateway {
        Gateway {
            routes,
            cors: config.cors.clone(),
            relay: Relay {
                upstreams: upstreams.clone(),
                hub,
                max_body: config.limits.max_body,
            },
            upstreams,
            life,
            max_body: config.limits.max_body,
            keepalive_secs: config.listener.keepalive_timeout.as_secs().max(1),
        }
    }

    async fn preflight(&self, session: &mut Session) -> Result<bool> {
        let cors = cors_headers(
            &self.cors,
            session
                .req_header()
                .headers
                .get("Origin")
                .and_then(|o| o.to_str().ok()),
        );
        if cors.is_empty() {
            return Ok(false);
        }
        let mut h = respond::header(204, "", 0)?;
        for (k, v) in cors {
            h.insert_header(k, v)?;
        }
        h.insert_header(
            "Access-Control-Allow-Methods",
            "GET, POST, PUT, PATCH, DELETE, OPTIONS",
        )?;
        h.insert_header(
            "Access-Control-Allow-Headers",
            "Authorization, Content-Type, Last-Event-ID, If-None-Match",
        )?;
        h.insert_header("Access-Control-Max-Age", "600")?;
        respond::send(session, h, Bytes::new()).await?;
        Ok(true)
    }

    fn too_big(&self, session: &Session) -> bool {
        crate::http1::declared_length(&session.req_header().headers)
            .is_some_and(|n| n > self.max_body)
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            _in_flight: self.life.enter(),
            pool: None,
            peer_index: 0,
            tries: 0,
            upstream_started: None,
            observed: false,
            body_seen: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let keepalive =
            crate::http1::keepalive(session, self.keepalive_secs, self.life.is_draining());
        session.set_keepalive(keepalive);
        let req = session.req_header();
        let method = req.method.as_str().to_string();
        // The same parse of the same bytes as the front door's.
        let target = match std::str::from_utf8(req.raw_path()).map(RequestTarget::parse) {
            Ok(Ok(target)) => target,
            // Only HTTP/2 requests get here with a bad target: HTTP/1
            // heads were refused (and counted) by the front door.
            Ok(Err(e)) => {
                Refusal::BadTarget.count();
                crate::error::refusal(session, &RequestError::from(e), &[]).await?;
                return Ok(true);
            }
            Err(_) => {
                Refusal::BadTarget.count();
                let e = RequestError::BadRequest("the request target is not UTF-8".into());
                crate::error::refusal(session, &e, &[]).await?;
                return Ok(true);
            }
        };
        let path = target.path();
        if method == "OPTIONS"
            && req.headers.contains_key("Access-Control-Request-Method")
            && self.preflight(session).await?
        {
            return Ok(true);
        }
        // Routed again (the front door found the route first): Pingora's
        // session parses the head anew, and nothing of the front door's
        // match can travel with it. One `RouteTable::find` (~100 ns).
        match self.routes.find(&method, &target) {
            Match::Found(route, params) => match &route.action {
                Action::Subscribe(_) => {
                    // The front door serves every subscribe request but a
                    // CORS preflight, which is no subscription.
                    let e = RequestError::MethodNotAllowed {
                        detail: format!("{method} does not subscribe"),
                        allow: "GET".into(),
                    };
                    crate::error::refusal(session, &e, &[]).await?;
                    Ok(true)
                }
                Action::Proxy(p) if p.publish.is_some() || p.publish_from_header => {
                    self.relay.serve(session, p, &params).await?;
                    Ok(true)
                }
                Action::Proxy(_) | Action::Watch(_) => {
                    if self.too_big(session) {
                        let e = RequestError::PayloadTooLarge(format!(
                            "request body is larger than limits.max_body ({} bytes)",
                            self.max_body
                        ));
                        session.set_keepalive(None);
                        crate::error::refusal(session, &e, &[]).await?;
                        return Ok(true);
                    }
                    let upstream = route.action.upstream().unwrap_or_default();
                    ctx.pool = self.upstreams.get(upstream).cloned();
                    Ok(false)
                }
            },
            Match::MethodNotAllowed(allowed) => {
                let e = RequestError::MethodNotAllowed {
                    detail: format!("{method} is not allowed on {path}"),
                    allow: allowed.join(", "),
                };
                crate::error::refusal(session, &e, &[]).await?;
                Ok(true)
            }
            Match::NotFound => {
                let e = RequestError::NotFound(format!("no route for {path}"));
                crate::error::refusal(session, &e, &[]).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let pool = ctx
            .pool
            .clone()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "route has no upstream"))?;
        ctx.peer_index = pool.pick();
        ctx.tries += 1;
        ctx.upstream_started.get_or_insert_with(Instant::now);
        Ok(Box::new(pool.peer(ctx.peer_index).await?))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(pool) = &ctx.pool {
            pool.mark_failed(ctx.peer_index);
            if ctx.tries < pool.len() {
                e.set_retry(true);
            }
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        request: &mut RequestHeader,
        _ctx: &mut Ctx,
    ) -> Result<()> {
        let client = session.req_header();
        // Origin-form, whatever form the client's target had.
        let origin_form = client.uri.path_and_query().map_or("/", |p| p.as_str());
        if client.uri.authority().is_some() {
            let uri = http::Uri::try_from(origin_form)
                .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "request target", e))?;
            request.set_uri(uri);
        }
        // An Upgrade (WebSocket) is the one hop-by-hop exchange Pingora
        // carries through itself.
        let upgrade = client.headers.contains_key(http::header::UPGRADE)
            && crate::upstream::connection_named(&client.headers).contains(&http::header::UPGRADE);
        if !upgrade {
            strip_hop_by_hop(request);
        }
        // Several Content-Length fields of one value (checked by the front
        // door): one field.
        let lengths = request.headers.get_all(http::header::CONTENT_LENGTH);
        if lengths.iter().count() > 1 || lengths.iter().any(|v| v.as_bytes().contains(&b',')) {
            if let Some(one) = crate::http1::declared_length(&request.headers) {
                request.remove_header(&http::header::CONTENT_LENGTH);
                request.insert_header(http::header::CONTENT_LENGTH, one.to_string())?;
            }
        }
        add_forwarded(request, client, &Peer::of(session))
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.body_seen += body.as_ref().map_or(0, |b| b.len() as u64);
        if ctx.body_seen > self.max_body {
            return Error::e_explain(
                ErrorType::HTTPStatus(413),
                "request body is larger than limits.max_body",
            );
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // What the upstream's `Connection` names, and the hop-by-hop
        // headers, are for its hop only; but the framing (Pingora frames the
        // client's hop from it) and a 101's upgrade.
        for name in crate::upstream::connection_named(&response.headers) {
            response.remove_header(&name);
        }
        if response.status != http::StatusCode::SWITCHING_PROTOCOLS {
            for name in [
                "keep-alive",
                "proxy-connection",
                "proxy-authenticate",
                "trailer",
                "upgrade",
                "te",
            ] {
                response.remove_header(name);
            }
        }
        if let (Some(pool), Some(started)) = (&ctx.pool, ctx.upstream_started) {
            observe(&pool.name, Some(response.status.as_u16()), started);
            ctx.observed = true;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        _ctx: &mut Ctx,
    ) -> Result<()> {
        // An HTTP/1.0 client knows no chunked coding (RFC 9112 §6.1): an
        // answer without a length ends with the connection.
        let old = session.req_header().version == http::Version::HTTP_10;
        if old
            && !session.is_http2()
            && response.headers.get(http::header::CONTENT_LENGTH).is_none()
        {
            response.remove_header(&http::header::TRANSFER_ENCODING);
            session.set_keepalive(None);
        }
        Ok(())
    }

    async fn logging(&self, _session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        if let (Some(pool), Some(started), false) = (&ctx.pool, ctx.upstream_started, ctx.observed)
        {
            observe(&pool.name, None, started);
        }
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, _ctx: &mut Ctx) -> FailToProxy {
        let answer = match e.etype() {
            ErrorType::HTTPStatus(code) => Some(RequestError::with_status(*code, e.to_string())),
            _ => match e.esource() {
                ErrorSource::Upstream => Some(RequestError::upstream(e, e.to_string())),
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                        None
                    }
                    _ => Some(RequestError::BadRequest(e.to_string())),
                },
                ErrorSource::Internal | ErrorSource::Unset => {
                    Some(RequestError::Internal(e.to_string()))
                }
            },
        };
        let code = answer.as_ref().map_or(0, RequestError::status);
        if let Some(answer) = &answer {
            let _ = crate::error::refusal(session, answer, &[]).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}
