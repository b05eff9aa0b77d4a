//! The request-handling layer's one error, [`RequestError`]: why a request
//! is answered with an error instead of what it asked for. Its status, its
//! JSON `error` code and the header fields that go with it (`Allow`,
//! `Retry-After`, `WWW-Authenticate`) are decided here and nowhere else
//! (docs/api.md lists them); [`refusal`] and [`refusal_answer`] write the
//! answer, `{"error", "detail"}`, on whichever path the request took.

use crate::admission::Refused;
use crate::broker::BrokerError;
use crate::hub::HubError;
use crate::malformed::Malformed;
use crate::metrics::{Outcome, Refusal};
use crate::respond;
use bytes::Bytes;

/// Retry-After (seconds) of 503 answers.
pub const RETRY_AFTER: &str = "1";

/// Why a request gets an error answer. Its `Display` is the answer's
/// `detail`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    /// A malformed request: its head, target, cursor, timeout or format
    /// (400 `bad_request`).
    #[error("{0}")]
    BadRequest(String),
    /// A channel name that is not allowed (400 `bad_channel`).
    #[error("{0}")]
    BadChannel(String),
    /// A content type that is not a media type (400 `bad_content_type`).
    #[error("{0}")]
    BadContentType(String),
    /// A JSON publish body that does not parse (400 `bad_json`).
    #[error("{0}")]
    BadJson(String),
    /// A message of a JSON publish body that is not one (400 `bad_message`).
    #[error("{0}")]
    BadMessage(String),
    /// A publish without the right token (401 `unauthorized`, with
    /// `WWW-Authenticate: Bearer`).
    #[error("{0}")]
    Unauthorized(String),
    /// No route, or no such admin path (404 `not_found`).
    #[error("{0}")]
    NotFound(String),
    /// A method the route does not take (405 `method_not_allowed`, with
    /// `Allow`).
    #[error("{detail}")]
    MethodNotAllowed { detail: String, allow: String },
    /// The request head did not arrive in time (408 `header_timeout`).
    #[error("{0}")]
    HeaderTimeout(String),
    /// A body over `limits.max_body` (413 `payload_too_large`).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A head over `limits.max_head` (431 `header_too_large`).
    #[error("{0}")]
    HeaderTooLarge(String),
    /// A route that cannot be served as configured (500 `error`).
    #[error("{0}")]
    Internal(String),
    /// A failure Pingora's proxy reports by its status alone, with no kind
    /// of its own here (that status, `error`).
    #[error("{1}")]
    Other(u16, String),
    /// An upstream that failed (502 `bad_gateway`).
    #[error("{0}")]
    BadGateway(String),
    /// An upstream that did not answer in time (504 `gateway_timeout`).
    #[error("{0}")]
    GatewayTimeout(String),
    /// Over an admission limit: 429 `too_many_held` or `too_many_polls`
    /// per client, else 503 `unavailable` (with `Retry-After`).
    #[error("{}", .0.detail)]
    Admission(Refused),
    /// The hub could not serve a poll or a watch request (503, with
    /// `Retry-After`): `unavailable` over `limits.max_active_channels`,
    /// `broker_busy`, `broker_unavailable`.
    #[error("{0}")]
    Hub(HubError),
    /// The broker refused a publish or a channel-info read (503, with
    /// `Retry-After`): `too_many_channels`, `not_replicated`, else
    /// `broker_unavailable`; `detail` is the cause's text, or says more
    /// (what a batch published before it).
    #[error("{detail}")]
    Broker { cause: BrokerError, detail: String },
    /// The body did not arrive in time (408 `body_timeout`).
    #[error("{0}")]
    BodyTimeout(String),
    /// `/readyz` of a draining instance (503 `draining`).
    #[error("this instance is shutting down")]
    Draining,
    /// `/readyz` while the broker is unreachable (503 `broker_down`).
    #[error("the broker is unreachable")]
    BrokerDown,
}

impl RequestError {
    /// The broker's refusal `cause`, told as it is.
    pub fn broker(cause: BrokerError) -> RequestError {
        let detail = cause.to_string();
        RequestError::Broker { cause, detail }
    }

    /// An upstream's failure `e`, with `detail`: 504 on a timeout, else
    /// 502.
    pub fn upstream(e: &pingora::Error, detail: String) -> RequestError {
        use pingora::ErrorType::*;
        match e.etype() {
            ConnectTimedout | ReadTimedout | WriteTimedout => RequestError::GatewayTimeout(detail),
            _ => RequestError::BadGateway(detail),
        }
    }

    /// The answer to a request Pingora's proxy failed with `status`
    /// (`detail`): the kind of that status, else [`RequestError::Other`].
    pub fn with_status(status: u16, detail: String) -> RequestError {
        match status {
            400 => RequestError::BadRequest(detail),
            413 => RequestError::PayloadTooLarge(detail),
            502 => RequestError::BadGateway(detail),
            504 => RequestError::GatewayTimeout(detail),
            500 => RequestError::Internal(detail),
            _ => RequestError::Other(status, detail),
        }
    }

    /// The reason counted in `pollgate_refused_total`, unless the layer
    /// that refused counted it (the broker counts `broker_busy`).
    pub fn counted_as(&self) -> Option<Refusal> {
        match self {
            RequestError::Admission(refused) => Some(refused.refusal),
            RequestError::Hub(HubError::TooManyChannels(_)) => Some(Refusal::MaxActiveChannels),
            RequestError::Hub(HubError::Broker(BrokerError::Unavailable(_))) => {
                Some(Refusal::BrokerDown)
            }
            _ => None,
        }
    }

    /// The answer's status.
    pub fn status(&self) -> u16 {
        use RequestError::*;
        match self {
            BadRequest(_) | BadChannel(_) | BadContentType(_) | BadJson(_) | BadMessage(_) => 400,
            Unauthorized(_) => 401,
            NotFound(_) => 404,
            MethodNotAllowed { .. } => 405,
            HeaderTimeout(_) | BodyTimeout(_) => 408,
            PayloadTooLarge(_) => 413,
            HeaderTooLarge(_) => 431,
            Internal(_) => 500,
            Other(status, _) => *status,
            BadGateway(_) => 502,
            GatewayTimeout(_) => 504,
            Admission(refused) => refused.status(),
            Hub(_) | Broker { .. } | Draining | BrokerDown => 503,
        }
    }

    /// The answer's JSON `error` code.
    pub fn code(&self) -> &'static str {
        use RequestError::*;
        match self {
            BadRequest(_) => "bad_request",
            BadChannel(_) => "bad_channel",
            BadContentType(_) => "bad_content_type",
            BadJson(_) => "bad_json",
            BadMessage(_) => "bad_message",
            Unauthorized(_) => "unauthorized",
            NotFound(_) => "not_found",
            MethodNotAllowed { .. } => "method_not_allowed",
            HeaderTimeout(_) => "header_timeout",
            BodyTimeout(_) => "body_timeout",
            Draining => "draining",
            BrokerDown => "broker_down",
            PayloadTooLarge(_) => "payload_too_large",
            HeaderTooLarge(_) => "header_too_large",
            Internal(_) | Other(..) => "error",
            BadGateway(_) => "bad_gateway",
            GatewayTimeout(_) => "gateway_timeout",
            Admission(refused) => refused.error(),
            Hub(HubError::TooManyChannels(_)) => "unavailable",
            Hub(HubError::Broker(e)) => match e {
                BrokerError::Busy(_) => "broker_busy",
                BrokerError::Unavailable(_) => "broker_unavailable",
                BrokerError::TooManyChannels(_) => "too_many_channels",
                BrokerError::NotReplicated(_) => "not_replicated",
            },
            Broker { cause, .. } => match cause {
                BrokerError::TooManyChannels(_) => "too_many_channels",
                BrokerError::NotReplicated(_) => "not_replicated",
                _ => "broker_unavailable",
            },
        }
    }

    /// The header field that goes with the answer, if any.
    pub fn field(&self) -> Option<(&'static str, String)> {
        match self {
            RequestError::MethodNotAllowed { allow, .. } => Some(("Allow", allow.clone())),
            RequestError::Unauthorized(_) => Some(("WWW-Authenticate", "Bearer".into())),
            RequestError::Admission(refused) => Some(("Retry-After", refused.retry_after())),
            RequestError::Hub(_)
            | RequestError::Broker { .. }
            | RequestError::Draining
            | RequestError::BrokerDown => Some(("Retry-After", RETRY_AFTER.into())),
            _ => None,
        }
    }

    /// Counts a poll answered with this error: a refusal (429, 503) as
    /// `rejected`, with its reason unless the layer that refused counted
    /// it ([`RequestError::counted_as`]); any other error as `error`.
    pub fn count(&self) {
        if !matches!(self.status(), 429 | 503) {
            return Outcome::Error.count();
        }
        if let Some(refusal) = self.counted_as() {
            refusal.count();
        }
        Outcome::Rejected.count();
    }

    /// The answer's body, `{"error", "detail"}`.
    pub fn json(&self) -> Vec<u8> {
        let body = serde_json::json!({ "error": self.code(), "detail": self.to_string() });
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// Writes the answer to `e` (its status, `{"error","detail"}` and its own
/// header field), with the `extra` header fields.
pub async fn refusal(
    to: &mut impl respond::Respond,
    e: &RequestError,
    extra: &[(&'static str, String)],
) -> pingora::Result<()> {
    let body = e.json();
    let mut h = respond::header(e.status(), "application/json", body.len())?;
    h.insert_header("Cache-Control", "no-store")?;
    if let Some((name, value)) = e.field() {
        h.insert_header(name, value)?;
    }
    for (k, v) in extra {
        h.insert_header(*k, v.as_str())?;
    }
    respond::send(to, h, Bytes::from(body)).await
}

/// The bytes of the whole answer to `e` ([`RequestError`]: its status,
/// `{"error","detail"}`, its own header field), with `Cache-Control:
/// no-store`, the `extra` header fields and `fields`.
pub fn refusal_answer(
    e: &RequestError,
    extra: &[(&str, &str)],
    fields: &[(&'static str, String)],
    keepalive: bool,
) -> Vec<u8> {
    let body = e.json();
    let mut head = respond::status_head(e.status(), "application/json", body.len());
    head.extend_from_slice(b"Cache-Control: no-store\r\n");
    if let Some((name, value)) = e.field() {
        respond::push_field(&mut head, name, &value);
    }
    for (name, value) in extra {
        respond::push_field(&mut head, name, value);
    }
    respond::assemble(&head, fields, &body, keepalive)
}

impl From<Malformed> for RequestError {
    fn from(m: Malformed) -> RequestError {
        RequestError::BadRequest(m.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a client reads of each kind, as docs/api.md lists them.
    #[test]
    fn each_error_has_the_status_code_and_fields_the_api_documents() {
        let busy = RequestError::Hub(HubError::Broker(BrokerError::Busy("full".into())));
        assert_eq!((busy.status(), busy.code()), (503, "broker_busy"));
        assert_eq!(busy.field(), Some(("Retry-After", "1".into())));
        // A busy broker refusing a publish is `broker_unavailable` there.
        let publish = RequestError::broker(BrokerError::Busy("full".into()));
        assert_eq!(publish.code(), "broker_unavailable");
        let kept = RequestError::broker(BrokerError::TooManyChannels(3));
        assert_eq!((kept.status(), kept.code()), (503, "too_many_channels"));
        let method = RequestError::MethodNotAllowed {
            detail: "GET only".into(),
            allow: "GET, HEAD".into(),
        };
        assert_eq!(
            (method.status(), method.code()),
            (405, "method_not_allowed")
        );
        assert_eq!(method.field(), Some(("Allow", "GET, HEAD".into())));
        assert_eq!(method.to_string(), "GET only");
        let json: serde_json::Value = serde_json::from_slice(&method.json()).unwrap();
        assert_eq!(json["error"], "method_not_allowed");
        assert_eq!(json["detail"], "GET only");
        let token = RequestError::Unauthorized("no token".into());
        assert_eq!(token.field(), Some(("WWW-Authenticate", "Bearer".into())));
        assert_eq!(RequestError::HeaderTooLarge("big".into()).status(), 431);
    }
}
