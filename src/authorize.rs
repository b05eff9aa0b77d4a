//! Subscriber authorization (SPEC 5): before a poll is held, the same path
//! and query are sent as a GET to an upstream with the client's headers; a
//! 2xx allows, anything else is the client's answer. Decisions can be cached
//! per credentials (`Authorization`, `Cookie`) and path, and concurrent
//! polls with the same key share one upstream call.

use crate::upstream::{forwarded_copy, Upstreams};
use bytes::Bytes;
use parking_lot::Mutex;
use pingora::http::RequestHeader;
use pingora::{Error, ErrorType, Result};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

/// Largest authorization answer body passed back to the client.
const MAX_DENIAL_BODY: u64 = 64 * 1024;
/// Cache size at which expired entries are swept.
const SWEEP_AT: usize = 10_000;
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

type Key = (String, String, Option<String>, Option<String>);

struct Entry {
    created: Instant,
    decision: Arc<OnceCell<Decision>>,
}

/// Asks upstreams whether a poll may be held.
pub struct Authorizer {
    upstreams: Arc<Upstreams>,
    cache: Mutex<HashMap<Key, Entry>>,
}

impl Authorizer {
    pub fn new(upstreams: Arc<Upstreams>) -> Authorizer {
        Authorizer {
            upstreams,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Decides for the client request `client` (from `client_ip`), asking
    /// `upstream` (or the cache, when `ttl` is not zero). Errors are
    /// upstream failures.
    pub async fn check(
        &self,
        client: &RequestHeader,
        client_ip: Option<String>,
        upstream: &str,
        ttl: Duration,
    ) -> Result<Decision> {
        // A GET to the same path and query, with the client's headers.
        let request = forwarded_copy(client, http::Method::GET, client_ip)?;
        if ttl.is_zero() {
            return self.ask(upstream, &request).await;
        }
        let header = |n: &str| {
            request
                .headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        // SPEC 5: keyed on credentials and the path (not the query: cursors change it).
        let path = request.uri.path().to_string();
        let key = (
            upstream.to_string(),
            path,
            header("Authorization"),
            header("Cookie"),
        );
        let cell = {
            let mut cache = self.cache.lock();
            let now = Instant::now();
            if cache.len() >= SWEEP_AT {
                cache.retain(|_, e| now.duration_since(e.created) < ttl);
            }
            let entry = cache.entry(key).or_insert_with(|| Entry {
                created: now,
                decision: Arc::new(OnceCell::new()),
            });
            if now.duration_since(entry.created) >= ttl {
                *entry = Entry {
                    created: now,
                    decision: Arc::new(OnceCell::new()),
                };
            }
            entry.decision.clone()
        };
        cell.get_or_try_init(|| self.ask(upstream, &request))
            .await
            .cloned()
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
