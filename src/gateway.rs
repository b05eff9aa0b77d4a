//! The client-facing listener: Pingora's `ProxyHttp` for pollgate.
//!
//! `request_filter` matches the route: subscribe routes are answered there
//! (by the [`Poller`]), proxy routes continue through Pingora to their
//! upstream, anything else is a JSON 404 (or 405).

use crate::config::{Config, UpstreamConfig};
use crate::hub::Hub;
use crate::lifecycle::{InFlight, Lifecycle};
use crate::poll::{cors_headers, Poller};
use crate::respond;
use crate::routes::{Action, Match, RouteTable};
use async_trait::async_trait;
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Seconds an idle client connection is kept open between requests.
pub const KEEPALIVE_SECS: u64 = 75;

/// One upstream pool: its addresses are used in turn.
struct Upstream {
    config: UpstreamConfig,
    next: AtomicUsize,
}

/// The gateway service.
pub struct Gateway {
    routes: RouteTable,
    poller: Poller,
    life: Arc<Lifecycle>,
    upstreams: HashMap<String, Upstream>,
}

/// Per-request state.
pub struct Ctx {
    _in_flight: InFlight,
    upstream: Option<String>,
}

impl Gateway {
    /// A gateway serving `routes` of `config` from `hub`.
    pub fn new(
        config: &Config,
        routes: RouteTable,
        hub: Arc<Hub>,
        life: Arc<Lifecycle>,
    ) -> Gateway {
        Gateway {
            routes,
            poller: Poller {
                hub,
                life: life.clone(),
                max_held: config.limits.max_held,
                cors: config.cors.clone(),
            },
            life,
            upstreams: config
                .upstreams
                .iter()
                .map(|(name, c)| {
                    let up = Upstream {
                        config: c.clone(),
                        next: AtomicUsize::new(0),
                    };
                    (name.clone(), up)
                })
                .collect(),
        }
    }

    async fn preflight(&self, session: &mut Session) -> Result<bool> {
        let cors = cors_headers(&self.poller.cors, session);
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
        respond::send(session, h, bytes::Bytes::new()).await?;
        Ok(true)
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            _in_flight: self.life.enter(),
            upstream: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let draining = self.life.is_draining();
        session.set_keepalive((!draining).then_some(KEEPALIVE_SECS));
        let req = session.req_header();
        let method = req.method.as_str().to_string();
        let path = req.uri.path().to_string();
        if method == "OPTIONS"
            && req.headers.contains_key("Access-Control-Request-Method")
            && self.preflight(session).await?
        {
            return Ok(true);
        }
        match self.routes.find(&method, &path) {
            Match::Found(route, params) => match &route.action {
                Action::Subscribe(sub) => {
                    self.poller.serve(session, sub, &params).await?;
                    Ok(true)
                }
                Action::Proxy(p) => {
                    ctx.upstream = Some(p.upstream.clone());
                    Ok(false)
                }
            },
            Match::MethodNotAllowed(allowed) => {
                let detail = format!("{method} is not allowed on {path}");
                let extra = [("Allow", allowed.join(", "))];
                respond::error(session, 405, "method_not_allowed", &detail, &extra).await?;
                Ok(true)
            }
            Match::NotFound => {
                let detail = format!("no route for {path}");
                respond::error(session, 404, "not_found", &detail, &[]).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let up = ctx
            .upstream
            .as_deref()
            .and_then(|name| self.upstreams.get(name))
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "route has no upstream"))?;
        let addrs = &up.config.addrs;
        let addr = &addrs[up.next.fetch_add(1, Ordering::Relaxed) % addrs.len()];
        let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
        let sni = up.config.sni.clone().unwrap_or_else(|| host.to_string());
        // Resolved here so that a name that does not resolve is a 502, not a
        // panic inside HttpPeer::new.
        let resolved = tokio::net::lookup_host(addr.as_str())
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                Error::explain(
                    ErrorType::ConnectNoRoute,
                    format!("cannot resolve upstream address {addr}"),
                )
                .into_up()
            })?;
        let mut peer = HttpPeer::new(resolved, up.config.tls, sni);
        peer.options.connection_timeout = Some(up.config.connect_timeout);
        peer.options.read_timeout = Some(up.config.read_timeout);
        Ok(Box::new(peer))
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, _ctx: &mut Ctx) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if e.esource() == &ErrorSource::Upstream =>
            {
                504
            }
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        if code > 0 {
            let kind = match code {
                502 => "bad_gateway",
                504 => "gateway_timeout",
                400 => "bad_request",
                _ => "error",
            };
            let _ = respond::error(session, code, kind, &e.to_string(), &[]).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}
