//! Watch routes (docs/watch.md): a legacy GET held until its representation
//! changes, without the backend knowing.
//!
//! A GET on a `watch:` route is fetched from the upstream and answered with
//! an `ETag` (the upstream's, or a hash of the answer). When the client's
//! `If-None-Match` names the current ETag, the request is held on the
//! route's channels instead; a message there means "it may have changed":
//! the gateway fetches again and answers if the ETag moved, else holds on.
//! On timeout the client gets `304 Not Modified`.
//!
//! Fetches are shared: watchers whose requests match in upstream, path,
//! query, credentials (the route's `authorize_credentials`), `Accept*` and
//! the headers an answer `Vary`s on, at the same position of the channels (woken by the
//! same change, or back with its ETag right after), get one upstream GET,
//! kept for at most `SHARED_FOR`.

use crate::answer::Format;
use crate::cursor::Cursor;
use crate::error::RequestError;
use crate::hold::{self, Ending};
use crate::hub::{First, Hub, Polled};
use crate::metrics;
use crate::poll::{self, Poller};
use crate::respond;
use crate::routes::WatchRoute;
use crate::subscription::{asked_timeout, hold_time};
use crate::target::RequestTarget;
use crate::template::Params;
use crate::upstream::{client_header, forwarded_copy, Peer, Pool, Upstreams};
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession as Session;
use pingora::Result;
use std::sync::Arc;
use std::time::Duration;

/// Request headers that make two watchers' answers differ, besides the
/// route's credentials and those an upstream answer names in `Vary`.
const NEGOTIATED: [&str; 3] = ["Accept", "Accept-Encoding", "Accept-Language"];

/// How long a fetch made after a change serves the watchers that change
/// woke (and those coming back right after their answer), at most.
const SHARED_FOR: Duration = Duration::from_secs(2);
/// Fetches and resources remembered.
const REMEMBERED: u64 = 10_000;

/// Serves watch routes.
pub struct Watcher {
    hub: Arc<Hub>,
    upstreams: Arc<Upstreams>,
    /// Largest upstream answer read.
    max_body: u64,
    /// Fetches by [`fetch_key`]: one upstream GET per change and credentials.
    fetched: moka::future::Cache<String, Fetched>,
    /// The headers each resource's answers `Vary` on, from its last fetch.
    vary: moka::future::Cache<String, Arc<Vec<String>>>,
}

/// An upstream answer as watchers compare it (or why there is none).
type Fetched = std::result::Result<Arc<Representation>, RequestError>;

/// An upstream answer and its ETag.
pub struct Representation {
    header: ResponseHeader,
    body: Bytes,
    /// The ETag sent to clients (quoted).
    etag: String,
    /// The request headers the upstream said the answer varies on.
    vary: Vec<String>,
}

impl Watcher {
    /// A watcher over `hub`, fetching from `upstreams`.
    pub fn new(hub: Arc<Hub>, upstreams: Arc<Upstreams>, max_body: u64) -> Watcher {
        Watcher {
            hub,
            upstreams,
            max_body,
            fetched: moka::future::Cache::builder()
                .max_capacity(REMEMBERED)
                .time_to_live(SHARED_FOR)
                .build(),
            vary: moka::future::Cache::builder()
                .max_capacity(REMEMBERED)
                .time_to_idle(Duration::from_secs(600))
                .build(),
        }
    }

    /// Answers one GET on watch `route`, whose path captured `params`, at
    /// once or when its representation changes; `poller` admits and holds it
    /// like a long-poll.
    pub async fn serve(
        &self,
        poller: &Poller,
        session: &mut Session,
        (target, route, params): (&RequestTarget, &WatchRoute, &Params<'_>),
    ) -> Result<()> {
        let mut channels = Vec::with_capacity(route.channels.len());
        for t in &route.channels {
            match t.render(params) {
                Ok(name) if !channels.contains(&name) => channels.push(name),
                Ok(_) => {}
                Err(e) => {
                    let e = RequestError::BadRequest(e.to_string());
                    return crate::error::refusal(session, &e, &[]).await;
                }
            }
        }
        // The query stays the upstream's; its `timeout=` also shortens the hold.
        let hold = match hold_time(asked_timeout(target).as_deref(), route.timeout) {
            Ok(hold) => hold,
            Err(e) => return crate::error::refusal(session, &e, &[]).await,
        };
        let Some(pool) = self.upstreams.get(&route.upstream).cloned() else {
            let e = RequestError::Internal("route has no upstream".into());
            return crate::error::refusal(session, &e, &[]).await;
        };
        let _admitted = match poller
            .admission
            .admit(|| poller.admission.clients.of_session(session))
        {
            Ok(admitted) => admitted,
            Err(refused) => {
                return poller
                    .refuse(session, RequestError::Admission(refused))
                    .await
            }
        };
        if let Some(authorize) = &route.authorize {
            if Box::pin(poller.authorized(session, target, authorize))
                .await?
                .is_none()
            {
                return Ok(());
            }
        }
        let request = upstream_request(session)?;
        let known = session
            .req_header()
            .headers
            .get("If-None-Match")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let deadline = tokio::time::Instant::now() + hold::jitter(hold);
        let mut cursor: Option<Cursor> = None;
        // The representation and the position of the channels it reflects.
        let mut current: Option<(Arc<Representation>, Cursor)> = None;
        loop {
            // Registered before fetching, so that no change is missed
            // between the fetch and the hold.
            let poll = self
                .hub
                .poll(&channels, cursor.clone(), First::Newest, Format::Envelope)
                .await;
            let (held, position) = match poll {
                Ok(Polled::Held(held)) => {
                    let at = held.cursor().clone();
                    (Some(held), at)
                }
                Ok(Polled::Ready(answer)) => (None, answer.cursor.clone()),
                Err(e) => return poller.refuse(session, RequestError::Hub(e)).await,
            };
            cursor = Some(position.clone());
            let stale = current.as_ref().is_none_or(|(_, at)| *at != position);
            if stale {
                match self.fetch(&pool, route, &request, &position).await {
                    Ok(rep) => current = Some((rep, position)),
                    Err(e) => return crate::error::refusal(session, &e, &[]).await,
                }
            }
            let Some((rep, _)) = &current else {
                continue;
            };
            if !matches(known.as_deref(), &rep.etag) {
                return poller.holder.write(answer(session, rep, false)).await;
            }
            let Some(mut held) = held else {
                continue; // changed while fetching: fetch again
            };
            // Down again after the hold, or if this future is dropped in it.
            let watching = metrics::GaugeGuard::up(&metrics::HELD_WATCHERS);
            let ending = poller.holder.hold(session, &mut held, deadline).await;
            drop(watching);
            match ending {
                Ending::Woken(answer) => cursor = Some(answer.cursor.clone()),
                Ending::Repoll => {}
                Ending::Timeout | Ending::Drain => {
                    if matches!(ending, Ending::Drain) {
                        session.set_keepalive(None);
                    }
                    return poller.holder.write(answer(session, rep, true)).await;
                }
                Ending::Gone => return poll::gone(),
            }
        }
    }

    /// The upstream's answer to `request` for the channels at `position`,
    /// shared by every watcher with the same [`fetch_key`]: those woken by
    /// the same change, and those coming back with its ETag right after.
    async fn fetch(
        &self,
        pool: &Pool,
        route: &WatchRoute,
        request: &RequestHeader,
        position: &Cursor,
    ) -> Fetched {
        let resource = format!("{}\n{}", route.upstream, request.uri);
        let vary = self.vary.get(&resource).await.unwrap_or_default();
        let names = route.credentials.names().iter().map(|n| n.as_str());
        let key = fetch_key(
            &resource,
            request,
            names.chain(vary.iter().map(String::as_str)),
            position,
        );
        self.fetched
            .get_with(key, async {
                let result = self
                    .upstreams
                    .exchange(pool, request, Bytes::new(), self.max_body)
                    .await;
                let outcome = if result.is_ok() { "ok" } else { "error" };
                metrics::WATCH_FETCHES.with_label_values(&[outcome]).inc();
                match result {
                    Ok(a) => {
                        let rep = Arc::new(Representation::new(a.header, a.body));
                        if *vary != rep.vary {
                            self.vary.insert(resource, Arc::new(rep.vary.clone())).await;
                        }
                        Ok(rep)
                    }
                    Err(e) => Err(RequestError::upstream(&e, format!("upstream: {e}"))),
                }
            })
            .await
    }
}

impl Representation {
    fn new(header: ResponseHeader, body: Bytes) -> Representation {
        let given = header
            .headers
            .get("ETag")
            .and_then(|v| v.to_str().ok())
            .filter(|_| header.status.is_success())
            .map(str::to_string);
        let etag = given.unwrap_or_else(|| hashed_etag(header.status.as_u16(), &body));
        let vary = header
            .headers
            .get_all("Vary")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        Representation {
            header,
            body,
            etag,
            vary,
        }
    }
}

/// The ETag of an answer that brings none (or is not 2xx): `"pg-"` and the
/// 16 lowercase hex digits of XXH3-64 (seed 0) over the status code as
/// three ASCII digits followed by the body's bytes, quoted. The same on
/// every build and release, so instances of any version agree
/// (docs/watch.md, "ETags").
pub fn hashed_etag(status: u16, body: &[u8]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    h.update(itoa::Buffer::new().format(status).as_bytes());
    h.update(body);
    format!("\"pg-{:016x}\"", h.digest())
}

/// Whether an `If-None-Match` value names `etag` (weak or strong; `*` names
/// any).
fn matches(if_none_match: Option<&str>, etag: &str) -> bool {
    let Some(list) = if_none_match else {
        return false;
    };
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_string();
    let etag = bare(etag);
    list.split(',').any(|t| t.trim() == "*" || bare(t) == etag)
}

/// What a fetch is shared by: the `resource` (upstream, path and query),
/// every field of the request's headers `named` (the route's credentials
/// and those its answers vary on) and of `Accept*`, and the position of
/// the channels.
fn fetch_key<'a>(
    resource: &str,
    request: &RequestHeader,
    named: impl Iterator<Item = &'a str>,
    position: &Cursor,
) -> String {
    let mut key = format!("{resource}\n{position}");
    for name in NEGOTIATED.iter().copied().chain(named) {
        for value in request.headers.get_all(name) {
            key.push('\n');
            key.push_str(name);
            key.push(':');
            key.push_str(&String::from_utf8_lossy(value.as_bytes()));
        }
    }
    key
}

/// The client's GET as sent upstream: unconditional (the gateway compares
/// ETags itself), with `X-Forwarded-*`.
fn upstream_request(session: &Session) -> Result<RequestHeader> {
    let client = session.req_header();
    let path = client.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = forwarded_copy(client, http::Method::GET, path, &Peer::of(session))?;
    for conditional in ["If-None-Match", "If-Modified-Since", "If-Match", "If-Range"] {
        request.remove_header(conditional);
    }
    Ok(request)
}

/// Writes `rep` with its ETag, or 304 Not Modified with it when
/// `not_modified`.
async fn answer(session: &mut Session, rep: &Representation, not_modified: bool) -> Result<()> {
    let mut header = client_header(&rep.header)?;
    header.insert_header("ETag", rep.etag.as_str())?;
    if not_modified {
        header.set_status(304)?;
        for framing in ["Content-Type", "Content-Encoding", "Content-Range"] {
            header.remove_header(framing);
        }
        return respond::send(session, header, Bytes::new()).await;
    }
    header.insert_header("Content-Length", rep.body.len().to_string())?;
    respond::send(session, header, rep.body.clone()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_lists_and_weak_tags_match() {
        assert!(matches(Some("\"a\""), "\"a\""));
        assert!(matches(Some("\"x\", W/\"a\""), "\"a\""));
        assert!(matches(Some("*"), "\"a\""));
        assert!(!matches(Some("\"b\""), "\"a\""));
        assert!(!matches(None, "\"a\""));
    }

    #[test]
    fn a_body_without_etag_gets_a_strong_one_that_follows_it() {
        let ok = || ResponseHeader::build(200, None).unwrap();
        let a = Representation::new(ok(), Bytes::from_static(b"one"));
        let b = Representation::new(ok(), Bytes::from_static(b"one"));
        let c = Representation::new(ok(), Bytes::from_static(b"two"));
        assert_eq!(a.etag, b.etag);
        assert_ne!(a.etag, c.etag);
        assert!(a.etag.starts_with("\"pg-") && !a.etag.starts_with("W/"));
        let mut tagged = ok();
        tagged.insert_header("ETag", "\"v7\"").unwrap();
        tagged
            .insert_header("Vary", "Accept-Language, X-Tenant")
            .unwrap();
        let d = Representation::new(tagged, Bytes::from_static(b"two"));
        assert_eq!(d.etag, "\"v7\"");
        assert_eq!(d.vary, ["Accept-Language", "X-Tenant"]);
    }

    /// The hashed ETag is pinned: XXH3-64 of the status's three digits and
    /// the body, as the reference implementation (libxxhash's
    /// `XXH3_64bits`) computes it. A change of hash or of the bytes hashed
    /// would make every watcher of a mixed-version fleet refetch.
    #[test]
    fn the_hashed_etag_is_xxh3_of_status_digits_then_body() {
        let ok = ResponseHeader::build(200, None).unwrap();
        let rep = Representation::new(ok, Bytes::from_static(b"one"));
        assert_eq!(rep.etag, "\"pg-a8b5243c6d251fd1\"");
        assert_eq!(
            hashed_etag(200, br#"{"status":"shipped"}"#),
            "\"pg-7cdb160b5bc02729\""
        );
        assert_eq!(hashed_etag(200, b""), "\"pg-ef1cd05ea96fe010\"");
        assert_eq!(hashed_etag(404, b""), "\"pg-3846bf4c75bbab9c\"");
        // Past 240 bytes XXH3 takes its long-input path.
        let long = "0123456789".repeat(100);
        assert_eq!(hashed_etag(200, long.as_bytes()), "\"pg-d35fad30e35d2107\"");
        // A non-2xx answer is hashed even when it brings an ETag.
        let mut missing = ResponseHeader::build(404, None).unwrap();
        missing.insert_header("ETag", "\"v7\"").unwrap();
        let rep = Representation::new(missing, Bytes::new());
        assert_eq!(rep.etag, "\"pg-3846bf4c75bbab9c\"");
    }
}
