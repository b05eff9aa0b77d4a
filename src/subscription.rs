//! What a subscribe request asks for (docs/api.md, "Subscribing"): the
//! one parse of its channels, cursor, timeout and format, from the head
//! either HTTP path read ([`SubscribeHead`]); the error is a 400.

use crate::answer::Format;
use crate::cursor::Cursor;
use crate::error::RequestError;
use crate::routes::SubscribeRoute;
use crate::target::{form_decode, query_pairs, RequestTarget};
use crate::template::Params;
use compact_str::CompactString;
use std::time::Duration;

/// What a subscribe request says, read from its head by either HTTP path.
pub struct SubscribeHead<'a> {
    /// The target's query as sent (without `?`).
    pub query: Option<&'a str>,
    pub last_event_id: Option<&'a str>,
    pub if_none_match: Option<&'a str>,
    pub accept: Option<&'a str>,
}

/// The subscription a request asks for.
pub struct Request {
    /// The channel names, rendered.
    pub channels: Channels,
    /// Where to start from (None: the route's `first`).
    pub cursor: Option<Cursor>,
    /// How long the poll may be held (before jitter).
    pub timeout: Duration,
    pub format: Format,
    /// Who polls, as the authorize upstream named them (presence).
    pub subscriber: Option<std::sync::Arc<str>>,
}

impl<'a> SubscribeHead<'a> {
    /// The facts of a request Pingora has read.
    pub fn of(
        req: &'a pingora::http::RequestHeader,
        target: &'a RequestTarget,
    ) -> SubscribeHead<'a> {
        SubscribeHead {
            query: target.query(),
            last_event_id: header_str(req, "Last-Event-ID"),
            if_none_match: header_str(req, "If-None-Match"),
            accept: header_str(req, "Accept"),
        }
    }

    /// The subscription this request asks for on `route` (whose path
    /// captured `params`); the error is a 400 `bad_request`.
    pub fn parse(&self, route: &SubscribeRoute, params: &Params) -> Result<Request, RequestError> {
        self.parse_on(route, channels(route, params)?)
    }

    /// [`SubscribeHead::parse`], with the route's `channels` rendered
    /// already.
    pub fn parse_on(
        &self,
        route: &SubscribeRoute,
        channels: Channels,
    ) -> Result<Request, RequestError> {
        // One pass over the query; the first of each parameter counts.
        let (mut cursor_q, mut timeout_q, mut format_q) = (None, None, None);
        for (name, value) in query_pairs(self.query.unwrap_or("")) {
            let slot = match name {
                "cursor" => &mut cursor_q,
                "timeout" => &mut timeout_q,
                "format" => &mut format_q,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(form_decode(value));
            }
        }
        let cursor_text = cursor_q
            .as_deref()
            .or(self.last_event_id)
            .or(self.if_none_match);
        let cursor = match cursor_text {
            Some(t) if !t.is_empty() => Some(Cursor::parse(t, channels.len())?),
            _ => None,
        };
        let timeout = hold_time(timeout_q.as_deref(), route.timeout)?;
        let format = match format_q.as_deref() {
            _ if self.wants_sse() => Format::Sse,
            None if route.raw => Format::Raw,
            None => Format::Envelope,
            Some("raw") => Format::Raw,
            Some("json") => Format::Envelope,
            Some(other) => {
                let detail = format!("format '{other}' is not json or raw");
                return Err(RequestError::BadRequest(detail));
            }
        };
        Ok(Request {
            channels,
            cursor,
            timeout,
            format,
            subscriber: None,
        })
    }

    /// Whether the client asks for a Server-Sent Events stream.
    pub fn wants_sse(&self) -> bool {
        self.accept.is_some_and(|a| a.contains("text/event-stream"))
    }
}

/// The channel names of a subscription: one per channel template of
/// `route`, rendered from `params`, each once (one, as a rule).
pub type Channels = smallvec::SmallVec<[CompactString; 1]>;

/// The channels `route` subscribes to for a path that captured `params`;
/// the error is a 400 `bad_request`.
pub fn channels(route: &SubscribeRoute, params: &Params) -> Result<Channels, RequestError> {
    let mut channels = Channels::with_capacity(route.channels.len());
    for t in &route.channels {
        let name = t
            .render(params)
            .map_err(|e| RequestError::BadRequest(e.to_string()))?;
        if !channels.contains(&name) {
            channels.push(name);
        }
    }
    Ok(channels)
}

/// How long a request may be held: the client's `timeout=` (seconds, a
/// decimal number) capped by the route's `max`, or `max` without one. The
/// error is a 400 `bad_request`.
pub fn hold_time(asked: Option<&str>, max: Duration) -> Result<Duration, RequestError> {
    let Some(t) = asked else { return Ok(max) };
    let secs: f64 = t
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s >= 0.0)
        .ok_or_else(|| {
            RequestError::BadRequest(format!("timeout '{t}' is not a number of seconds"))
        })?;
    Ok(Duration::from_secs_f64(secs.min(max.as_secs_f64())))
}

/// The first `timeout=` of a query, decoded (None when there is none).
pub fn asked_timeout(target: &RequestTarget) -> Option<std::borrow::Cow<'_, str>> {
    target
        .query_pairs()
        .find(|(name, _)| *name == "timeout")
        .map(|(_, value)| form_decode(value))
}

/// A request header's value as text (None when absent or not visible ASCII).
pub fn header_str<'a>(req: &'a pingora::http::RequestHeader, name: &str) -> Option<&'a str> {
    req.headers.get(name).and_then(|v| v.to_str().ok())
}
