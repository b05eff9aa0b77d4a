//! Subscriber authorization (docs/api.md, "Authorizing subscribers"):
//! before a poll is held, the same path and query are sent as a GET to an
//! upstream with the client's headers; a 2xx allows, anything else is the
//! client's answer.
//!
//! A route with `authorize_cache` remembers decisions in an [`AuthCache`]:
//! bounded (least recently used go first), keyed on the credentials
//! (`Authorization`, `Cookie`) and the whole path and query (tokens in the
//! query are credentials too), and concurrent identical checks share one
//! upstream call. The path is the one [`Target`] that also selected the
//! channels.

use crate::target::Target;
use crate::upstream::{forwarded_copy, Peer, Upstreams};
use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::{Error, ErrorType, Result};
use std::sync::Arc;
use std::time::Duration;

/// Largest authorization answer body passed back to the client.
const MAX_DENIAL_BODY: u64 = 64 * 1024;
/// Upstream headers passed on with a denial.
const PASSED_ON: &[&str] = &[
    "content-type",
    "www-authenticate",
    "location",
    "retry-after",
];

/// What the upstream decided.
#[derive(Clone, Debug)]
pub enum Decision {
    Allow,
    Deny(Arc<Denial>),
}

/// A refusal, answered to the client as the upstream gave it.
#[derive(Debug)]
pub struct Denial {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// Credentials and target of a check: `Authorization`, `Cookie`, and the
/// path with the query (less pollgate's own parameters).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    authorization: Option<Vec<u8>>,
    cookie: Option<Vec<u8>>,
    target: String,
}

/// Query parameters that pollgate reads itself and that change on every
/// poll; left out of the cache key so that consecutive polls share it.
const OWN_PARAMS: &[&str] = &["cursor", "timeout", "format"];

/// A route's remembered decisions.
pub struct AuthCache {
    decisions: moka::future::Cache<Key, Decision>,
}

impl std::fmt::Debug for AuthCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthCache")
            .field("entries", &self.decisions.entry_count())
            .finish()
    }
}

impl AuthCache {
    /// A cache keeping at most `size` decisions, each for `ttl`.
    pub fn new(size: u64, ttl: Duration) -> AuthCache {
        AuthCache {
            decisions: moka::future::Cache::builder()
                .max_capacity(size)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .time_to_live(ttl)
                .build(),
        }
    }

    fn key(client: &RequestHeader, target: &Target) -> Key {
        let header = |n: &str| client.headers.get(n).map(|v| v.as_bytes().to_vec());
        let mut key = target.path().to_string();
        let mut sep = '?';
        for pair in target.query().unwrap_or("").split('&') {
            let name = pair.split_once('=').map_or(pair, |(k, _)| k);
            if pair.is_empty() || OWN_PARAMS.contains(&name) {
                continue;
            }
            key.push(sep);
            key.push_str(pair);
            sep = '&';
        }
        Key {
            authorization: header("Authorization"),
            cookie: header("Cookie"),
            target: key,
        }
    }
}

/// Asks upstreams whether a poll may be held.
pub struct Authorizer {
    upstreams: Arc<Upstreams>,
}

impl Authorizer {
    /// An authorizer asking the routes' `authorize` upstreams among
    /// `upstreams`.
    pub fn new(upstreams: Arc<Upstreams>) -> Authorizer {
        Authorizer { upstreams }
    }

    /// Decides for the client request `client` to `target` (from
    /// `peer`), asking `upstream`, or `cache` when the route has one.
    /// Errors are upstream failures (never cached).
    pub async fn check(
        &self,
        client: &RequestHeader,
        target: &Target,
        peer: &Peer,
        upstream: &str,
        cache: Option<&AuthCache>,
    ) -> Result<Decision> {
        // A GET to the same path and query, with the client's headers.
        let request = forwarded_copy(client, http::Method::GET, &target.path_and_query(), peer)?;
        let Some(cache) = cache else {
            return self.ask(upstream, &request).await;
        };
        cache
            .decisions
            .try_get_with(AuthCache::key(client, target), self.ask(upstream, &request))
            .await
            .map_err(|e| Error::because(e.etype().clone(), "authorization", e.to_string()))
    }
    async fn ask(&self, upstream: &str, request: &RequestHeader) -> Result<Decision> {
        let pool = self.upstreams.get(upstream).ok_or_else(|| {
            Error::explain(ErrorType::InternalError, "unknown authorize upstream")
        })?;
        let answer = self
            .upstreams
            .exchange(pool, request, Bytes::new(), MAX_DENIAL_BODY)
            .await?;
        let status = answer.header.status.as_u16();
        if (200..300).contains(&status) {
            return Ok(Decision::Allow);
        }
        let headers = answer
            .header
            .headers
            .iter()
            .filter(|(n, _)| PASSED_ON.contains(&n.as_str()))
            .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        Ok(Decision::Deny(Arc::new(Denial {
            status,
            headers,
            body: answer.body,
        })))
    }
}
