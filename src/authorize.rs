//! Subscriber authorization (docs/api.md, "Authorizing subscribers"):
//! before a poll is held, the same path and query are sent as a GET to an
//! upstream with the client's credentials; a 2xx allows, anything else is
//! the client's answer.
//!
//! The credentials are the client headers a route names in
//! `authorize_credentials` ([`Credentials`]; `Authorization` and `Cookie`
//! by default), every field of each, HTTP/2 cookie crumbs joined into one
//! `Cookie`. Exactly those go to the upstream (with `Host` and
//! `X-Forwarded-*`), and exactly those key the route's [`AuthCache`]
//! (bounded, least recently used go first) together with the whole path
//! and query (tokens in the query are credentials too): nothing the
//! upstream can decide on is missing from the key. Concurrent identical
//! checks share one upstream call. The path is the one [`RequestTarget`] that
//! also selected the channels.

use crate::target::RequestTarget;
use crate::upstream::{add_forwarded, joined_cookie, Peer, Upstreams};
use bytes::Bytes;
use http::HeaderName;
use pingora::http::RequestHeader;
use pingora::{Error, ErrorType, Result};
use std::sync::Arc;
use std::time::Duration;

/// The answer header naming the subscriber (docs/presence.md).
pub const SUBSCRIBER: &str = "pollgate-subscriber";

/// Largest authorization answer body passed back to the client.
const MAX_DENIAL_BODY: u64 = 64 * 1024;
/// Upstream headers passed on with a denial.
const PASSED_ON: &[&str] = &[
    "content-type",
    "www-authenticate",
    "location",
    "retry-after",
];

/// Headers that cannot be credentials: framing, routing and hop-by-hop
/// fields, which pollgate sets itself.
const NOT_CREDENTIALS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// A route's `authorize:`: the upstream asked, the credentials sent, and
/// the decision cache when `authorize_cache` is set.
#[derive(Debug, Clone)]
pub struct Authorize {
    pub upstream: String,
    pub cache: Option<Arc<AuthCache>>,
    pub credentials: Credentials,
}

/// Why `authorize_credentials` is refused (after its key path).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("at most 32 headers")]
    TooMany,
    #[error("'{}' is not a header name", .0.escape_default())]
    NotAHeader(String),
    /// A framing, routing or hop-by-hop field (`NOT_CREDENTIALS`).
    #[error("'{0}' is set by pollgate, not a credential")]
    SetByPollgate(String),
    #[error("'{0}' is listed twice")]
    Twice(String),
}

/// The client headers that are credentials (`authorize_credentials`), in
/// the order configured.
#[derive(Debug, Clone, Default)]
pub struct Credentials(Arc<[HeaderName]>);

/// A request's credentials: each configured header's fields in order
/// (cookie crumbs joined into one field), by index into [`Credentials`].
pub type Presented = Vec<(u8, Bytes)>;

impl Credentials {
    /// The credentials named by `names`, or why a name cannot be one.
    pub fn parse(names: &[String]) -> std::result::Result<Credentials, CredentialsError> {
        if names.len() > 32 {
            return Err(CredentialsError::TooMany);
        }
        let mut parsed: Vec<HeaderName> = Vec::with_capacity(names.len());
        for name in names {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| CredentialsError::NotAHeader(name.clone()))?;
            if NOT_CREDENTIALS.contains(&header.as_str()) {
                return Err(CredentialsError::SetByPollgate(name.clone()));
            }
            if parsed.contains(&header) {
                return Err(CredentialsError::Twice(name.clone()));
            }
            parsed.push(header);
        }
        Ok(Credentials(parsed.into()))
    }

    /// The header names, in the order configured.
    pub fn names(&self) -> &[HeaderName] {
        &self.0
    }

    /// What `client` presents: every field of each credential header, in
    /// order, with `Cookie` fields joined by `; ` (RFC 9113 §8.2.3).
    pub fn of(&self, client: &RequestHeader) -> Presented {
        let mut presented = Presented::new();
        for (i, name) in self.0.iter().enumerate() {
            let i = i as u8;
            if name == http::header::COOKIE {
                if let Some(joined) = joined_cookie(&client.headers) {
                    presented.push((i, joined));
                }
                continue;
            }
            for value in client.headers.get_all(name) {
                presented.push((i, Bytes::copy_from_slice(value.as_bytes())));
            }
        }
        presented
    }
}

/// What the upstream decided.
#[derive(Clone, Debug)]
pub enum Decision {
    /// Allowed, with the subscriber's identity when the upstream named one
    /// (`Pollgate-Subscriber`, for presence).
    Allow(Option<Arc<str>>),
    Deny(Arc<Denial>),
}

/// A refusal, answered to the client as the upstream gave it.
#[derive(Debug)]
pub struct Denial {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// Credentials and target of a check: the credentials presented and the
/// path with the query (less pollgate's own parameters).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    credentials: Presented,
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

    fn key(credentials: Presented, target: &RequestTarget) -> Key {
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
            credentials,
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

    /// Decides for the client request `client` to `target` (from `peer`)
    /// as the route's `authorize` says: asking its upstream, or its cache
    /// when it has one. Errors are upstream failures (never cached).
    pub async fn check(
        &self,
        client: &RequestHeader,
        target: &RequestTarget,
        peer: &Peer,
        authorize: &Authorize,
    ) -> Result<Decision> {
        let presented = authorize.credentials.of(client);
        let request = request(client, target, peer, &authorize.credentials, &presented)?;
        let Some(cache) = &authorize.cache else {
            return self.ask(&authorize.upstream, &request).await;
        };
        cache
            .decisions
            .try_get_with(
                AuthCache::key(presented, target),
                self.ask(&authorize.upstream, &request),
            )
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
            let Some(named) = answer.header.headers.get(SUBSCRIBER) else {
                return Ok(Decision::Allow(None));
            };
            return match crate::presence::subscriber_id(named.as_bytes()) {
                Some(id) => Ok(Decision::Allow(Some(id))),
                None => Error::e_explain(
                    ErrorType::InvalidHTTPHeader,
                    "its Pollgate-Subscriber is not 1 to 256 bytes of UTF-8 without control characters",
                ),
            };
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

/// The authorize call for `client`: a GET to the same path and query with
/// exactly the `presented` credentials, `Host` and `X-Forwarded-*`.
fn request(
    client: &RequestHeader,
    target: &RequestTarget,
    peer: &Peer,
    credentials: &Credentials,
    presented: &Presented,
) -> Result<RequestHeader> {
    let path = target.path_and_query();
    let mut request = RequestHeader::build(http::Method::GET, path.as_bytes(), None)?;
    for (i, value) in presented {
        let name = credentials.names()[usize::from(*i)].clone();
        let value = http::HeaderValue::from_maybe_shared(value.clone())
            .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "bad credential"))?;
        request.append_header(name, value)?;
    }
    add_forwarded(&mut request, client, peer)?;
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(fields: &[(&str, &str)]) -> RequestHeader {
        let mut h = RequestHeader::build("GET", b"/p", None).unwrap();
        for (n, v) in fields {
            h.append_header(n.to_string(), *v).unwrap();
        }
        h
    }

    #[test]
    fn every_field_of_every_credential_counts() {
        let creds = Credentials::parse(&["Cookie".into(), "X-Api-Key".into()]).unwrap();
        let crumbs = client(&[("cookie", "a=1"), ("cookie", "session=V")]);
        let first_only = client(&[("cookie", "a=1")]);
        let joined = client(&[("cookie", "a=1; session=V")]);
        assert_ne!(creds.of(&crumbs), creds.of(&first_only));
        assert_eq!(creds.of(&crumbs), creds.of(&joined));
        let key = client(&[("x-api-key", "good")]);
        let other = client(&[("x-api-key", "bad")]);
        assert_ne!(creds.of(&key), creds.of(&other));
        assert_ne!(creds.of(&key), creds.of(&client(&[])));
        // Not named: not a credential.
        assert_eq!(
            creds.of(&client(&[("authorization", "x")])),
            Presented::new()
        );
    }

    #[test]
    fn framing_and_hop_by_hop_headers_are_not_credentials() {
        for bad in ["Host", "connection", "Content-Length", "bad name", ""] {
            assert!(Credentials::parse(&[bad.into()]).is_err(), "{bad}");
        }
        assert!(Credentials::parse(&["a".into(), "A".into()]).is_err());
        // The texts `pollgate check` prints after the key path.
        let why = |names: &[&str]| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            Credentials::parse(&names).unwrap_err().to_string()
        };
        assert_eq!(why(&["bad\tname"]), "'bad\\tname' is not a header name");
        assert_eq!(
            why(&["Host"]),
            "'Host' is set by pollgate, not a credential"
        );
        assert_eq!(why(&["a", "A"]), "'A' is listed twice");
        assert_eq!(why(&["x"; 33]), "at most 32 headers");
        assert!(Credentials::parse(&[]).is_ok());
    }
}
