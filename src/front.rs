//! The client listener's front door: long-polls are served here on a lean
//! HTTP session; every other request goes to Pingora's proxy (the
//! [`Gateway`](crate::gateway::Gateway)).
//!
//! Why: a connection that enters Pingora's proxy carries its per-request
//! machinery (a ~13 KiB future, the proxy session, cache and module state)
//! for as long as the request lasts. A held poll lasts seconds to minutes,
//! and there are tens of thousands of them. So this app reads the request
//! head itself, and only when the route is not a subscribe route hands the
//! connection (with the bytes already read) to the proxy.

use crate::gateway::{Gateway, KEEPALIVE_SECS};
use crate::lifecycle::Lifecycle;
use crate::poll::Poller;
use crate::routes::{Action, Match, Params, RouteTable, SubscribeRoute};
use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// Longest request head read before handing over (Pingora then answers it).
const MAX_HEAD: usize = 64 * 1024;
/// Idle time allowed before a request when no keep-alive is set.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The app behind the client listener.
pub struct Front {
    pub proxy: Arc<HttpProxy<Gateway>>,
    pub routes: Arc<RouteTable>,
    pub poller: Poller,
    pub life: Arc<Lifecycle>,
}

/// Reads until a whole request head is buffered. None when the connection
/// closes, stays idle past `idle`, or the server shuts down.
async fn read_head(
    stream: &mut Stream,
    idle: Duration,
    shutdown: &ShutdownWatch,
) -> Option<BytesMut> {
    let mut buf = BytesMut::with_capacity(512);
    let mut shutdown = shutdown.clone();
    let deadline = tokio::time::Instant::now() + idle;
    loop {
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() > MAX_HEAD {
            return Some(buf);
        }
        if buf.capacity() - buf.len() < 256 {
            buf.reserve(1024);
        }
        let read = tokio::select! {
            r = stream.read_buf(&mut buf) => r.ok()?,
            _ = shutdown.changed() => return None,
            _ = tokio::time::sleep_until(deadline) => return None,
        };
        if read == 0 {
            return None;
        }
    }
}

/// Method and path (without query) of a request head.
fn target(head: &[u8]) -> Option<(&str, &str)> {
    let line = head.split(|b| *b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let method = parts.next()?;
    let uri = parts.next()?;
    let path = uri.split('?').next()?;
    Some((method, path))
}

impl Front {
    /// The subscribe route for this head, if it is one.
    fn subscribe_route(&self, head: &[u8]) -> Option<(&SubscribeRoute, Params)> {
        let (method, path) = target(head)?;
        if method == "OPTIONS" {
            return None; // CORS preflight: the gateway answers it
        }
        match self.routes.find(method, path) {
            Match::Found(route, params) => match &route.action {
                Action::Subscribe(sub) => Some((sub, params)),
                Action::Proxy(_) => None,
            },
            _ => None,
        }
    }

    /// Serves one long-poll on `session` (whose head is buffered).
    async fn poll(
        &self,
        mut session: ServerSession,
        route: &SubscribeRoute,
        params: Params,
    ) -> Option<ReusedHttpStream> {
        let _in_flight = self.life.enter();
        match session.read_request().await {
            Ok(true) => {}
            _ => return None,
        }
        let draining = self.life.is_draining();
        session.set_keepalive((!draining).then_some(KEEPALIVE_SECS));
        if self
            .poller
            .serve(&mut session, route, &params)
            .await
            .is_err()
        {
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

#[async_trait]
impl HttpServerApp for Front {
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let keepalive = session.get_keepalive();
        let reuses = session.get_keepalive_reuses_remaining();
        let ServerSession::H1(h1) = session else {
            return self.proxy.process_new_http(session, shutdown).await;
        };
        // Pingora sets 60 s before a connection's first request; later ones
        // carry the keep-alive of the previous answer.
        let idle = keepalive.map_or(FIRST_REQUEST_TIMEOUT, Duration::from_secs);
        let mut stream = h1.into_inner();
        let head = read_head(&mut stream, idle, shutdown).await?;
        let route = self.subscribe_route(&head);
        let mut session = ServerSession::new_http1(stream);
        session.set_keepalive(keepalive);
        session.set_keepalive_reuses_remaining(reuses);
        session.set_pipelined_prefix(head);
        match route {
            // Boxed: an idle connection then carries only the head reader.
            Some((route, params)) => Box::pin(self.poll(session, route, params)).await,
            None => self.proxy.process_new_http(session, shutdown).await,
        }
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.proxy.server_options()
    }

    async fn http_cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_targets() {
        assert_eq!(
            super::target(b"GET /sub/a?cursor=1-0 HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(("GET", "/sub/a"))
        );
        assert_eq!(super::target(b"garbage"), None);
    }
}
