//! Subscribe requests on a Pingora session (docs/api.md, "Subscribing"):
//! parse ([`crate::subscription`]), admit ([`crate::admission`]), ask the
//! authorize upstream, hold ([`crate::hold`]) and write the answer as a JSON
//! envelope or a raw message (an SSE stream: [`crate::sse`]); refusals are
//! [`RequestError`]s. Also what the other held requests share with it: the
//! CORS headers, the write timeout, the count of refusals.

use crate::admission::Admission;
use crate::answer::{Answer, Format};
use crate::authorize::{Authorize, Authorizer, Decision};
use crate::config::Cors;
use crate::error::RequestError;
use crate::hold::{count_answered, Holder, Waited};
use crate::metrics::Outcome;
use crate::respond;
use crate::routes::SubscribeRoute;
use crate::subscription::{header_str, SubscribeHead};
use crate::target::RequestTarget;
use crate::template::Params;
use pingora::protocols::http::ServerSession as Session;
use pingora::{Error, ErrorType, Result};
use std::future::Future;
use std::pin::Pin;

/// Serves subscribe routes.
pub struct Poller {
    /// Holds polls against the hub.
    pub holder: Holder,
    /// Whether a new held request may start.
    pub admission: Admission,
    pub cors: Cors,
    pub authorizer: Authorizer,
}

/// A poll the authorize upstream allowed.
pub struct Allowed {
    /// Who it is, when the upstream said (`Pollgate-Subscriber`).
    pub subscriber: Option<std::sync::Arc<str>>,
}

/// The error that ends a request whose client left.
pub fn gone() -> Result<()> {
    Error::e_explain(ErrorType::ConnectionClosed, "client left a held poll")
        .map_err(|e| e.into_down())
}

impl Poller {
    /// Answers one subscribe request for `target` on `route`, whose path
    /// captured `params`, on a Pingora session (HTTP/2, and HTTP/1 requests
    /// that authorize, stream SSE or carry a body; the others are served by
    /// [`crate::h1`]).
    pub async fn serve(
        &self,
        session: &mut Session,
        target: &RequestTarget,
        route: &SubscribeRoute,
        params: &Params<'_>,
    ) -> Result<()> {
        let mut req = match SubscribeHead::of(session.req_header(), target).parse(route, params) {
            Ok(r) => r,
            Err(e) => return self.refuse(session, e).await,
        };
        let _admitted = match self
            .admission
            .admit(|| self.admission.clients.of_session(session))
        {
            Ok(admitted) => admitted,
            Err(refused) => return self.refuse(session, RequestError::Admission(refused)).await,
        };
        if let Some(authorize) = &route.authorize {
            match Box::pin(self.authorized(session, target, authorize)).await? {
                Some(allowed) => req.subscriber = allowed.subscriber,
                None => return Ok(()),
            }
        }
        if req.format == Format::Sse {
            // Boxed: SSE is rare, and its state would enlarge every poll.
            let cors = self.cors_headers(session);
            let sse = crate::sse::stream(&self.holder, cors, session, route, req);
            return Box::pin(sse).await;
        }
        match self.holder.wait(session, &req, route).await {
            Waited::Reply(reply) => {
                if reply.close {
                    session.set_keepalive(None);
                }
                self.answer(session, &reply.answer, reply.outcome, reply.live)
                    .await
            }
            Waited::Failed(e) => self.refuse(session, RequestError::Hub(e)).await,
            Waited::Gone => gone(),
        }
    }

    /// Answers `e` (with the CORS headers), counting it ([`RequestError::count`]).
    /// Boxed: refusals are rare, and writing one on a Pingora session is a
    /// large future that would otherwise enlarge every poll held on one.
    pub fn refuse<'a>(
        &'a self,
        session: &'a mut Session,
        e: RequestError,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>> {
        Box::pin(async move {
            e.count();
            let extra = self.cors_headers(session);
            self.holder
                .write(crate::error::refusal(session, &e, &extra))
                .await
        })
    }

    /// Asks the route's authorize upstream. Returns None when the client
    /// was answered (denied, or the upstream failed).
    pub async fn authorized(
        &self,
        session: &mut Session,
        target: &RequestTarget,
        authorize: &Authorize,
    ) -> Result<Option<Allowed>> {
        let peer = crate::upstream::Peer::of(session);
        match self
            .authorizer
            .check(session.req_header(), target, &peer, authorize)
            .await
        {
            Ok(Decision::Allow(subscriber)) => Ok(Some(Allowed { subscriber })),
            Ok(Decision::Deny(denial)) => {
                Outcome::Rejected.count();
                let mut h = pingora::http::ResponseHeader::build(
                    denial.status,
                    Some(denial.headers.len() + 4),
                )?;
                for (k, v) in &denial.headers {
                    h.append_header(k.clone(), v.as_str())?;
                }
                h.insert_header("Content-Length", denial.body.len().to_string())?;
                h.insert_header("Cache-Control", "no-store")?;
                for (k, v) in self.cors_headers(session) {
                    h.insert_header(k, v)?;
                }
                self.holder
                    .write(respond::send(session, h, denial.body.clone()))
                    .await?;
                Ok(None)
            }
            Err(e) => {
                let detail = format!("authorization upstream {}: {e}", authorize.upstream);
                self.refuse(session, RequestError::upstream(&e, detail))
                    .await?;
                Ok(None)
            }
        }
    }

    /// Writes an answer in its format and counts it.
    async fn answer(
        &self,
        session: &mut Session,
        answer: &Answer,
        outcome: Outcome,
        live: bool,
    ) -> Result<()> {
        let mut h = respond::header(answer.status(), answer.content_type(), answer.body.len())?;
        for (name, value) in answer.fields() {
            h.insert_header(name, value)?;
        }
        if session.get_keepalive().is_none() {
            h.insert_header("Connection", "close")?;
        }
        for (k, v) in self.cors_headers(session) {
            h.insert_header(k, v)?;
        }
        self.holder
            .write(respond::send(session, h, answer.body.clone()))
            .await?;
        count_answered(answer, outcome, live);
        Ok(())
    }

    /// CORS headers for the request's Origin, per `cors.allow_origins`.
    pub(crate) fn cors_headers(&self, session: &Session) -> Vec<(&'static str, String)> {
        cors_headers(&self.cors, header_str(session.req_header(), "Origin"))
    }
}

/// CORS headers for an allowed Origin (none when CORS is off or the origin
/// is not listed).
pub fn cors_headers(cors: &Cors, origin: Option<&str>) -> Vec<(&'static str, String)> {
    let Some(origin) = origin else {
        return Vec::new();
    };
    let any = cors.allow_origins.iter().any(|o| o == "*");
    if !any && !cors.allow_origins.iter().any(|o| o == origin) {
        return Vec::new();
    }
    vec![
        (
            "Access-Control-Allow-Origin",
            if any { "*".into() } else { origin.to_string() },
        ),
        (
            "Access-Control-Expose-Headers",
            "Pollgate-Cursor, Pollgate-Gap, ETag".into(),
        ),
        ("Vary", "Origin".into()),
    ]
}
