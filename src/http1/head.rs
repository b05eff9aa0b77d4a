//! The request head of an HTTP/1 connection, parsed once (httparse, as
//! Pingora does) into a [`Head`]: method, target, keep-alive, framing and
//! the fields the apps read; and the one parse of `Content-Length`
//! ([`content_length`]) that every path uses. A head a backend would choke
//! on is refused here, with the reason.

use crate::error::RequestError;
use crate::target;
use smallvec::SmallVec;

/// Most header lines in a request head (as Pingora allows).
const MAX_HEADERS: usize = 256;

/// Where the head ends in `buf` (just past its blank line), searching only
/// from `from` on (minus the 3 bytes a split terminator can reach back), so
/// that a head arriving byte by byte is not scanned again on every read.
pub(super) fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    // Every line ends in '\n': look only after each one for the blank line
    // ("\n" or "\r\n") that ends the head.
    let start = from.saturating_sub(3);
    memchr::memchr_iter(b'\n', &buf[start..]).find_map(|i| {
        let after = start + i + 1;
        match &buf[after..] {
            [b'\n', ..] => Some(after + 1),
            [b'\r', b'\n', ..] => Some(after + 2),
            _ => None,
        }
    })
}

/// What is read of a request head, borrowed from the connection's buffer.
#[derive(Debug)]
pub struct Head<'a> {
    /// Its length in bytes, up to and with its blank line.
    pub len: usize,
    pub method: &'a str,
    /// The request target as sent: parsed by the app, which may know it
    /// already (the same path as the connection's last poll).
    pub target: &'a str,
    /// The client keeps the connection after the answer (HTTP/1.1 unless
    /// `Connection: close`; HTTP/1.0 with `Connection: keep-alive`).
    pub keepalive: bool,
    /// The request ends with its head or with `content_length` bytes of
    /// body: no `Transfer-Encoding`, upgrade or 100-continue, at most one
    /// `Host` and one valid `Content-Length`.
    pub framed: bool,
    /// The body's length, when the head declares one.
    pub content_length: Option<u64>,
    /// How the request's end is found.
    pub ends: Ends,
    pub last_event_id: Option<&'a str>,
    pub if_none_match: Option<&'a str>,
    pub accept: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub authorization: Option<&'a [u8]>,
    /// The values of every `X-Forwarded-For` field, in order.
    pub forwarded_for: SmallVec<[&'a [u8]; 2]>,
}

/// How the end of a request is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ends {
    /// After its `Content-Length` bytes of body (or its head, without one).
    AtLength,
    /// At the end of its chunked body.
    Chunked,
    /// Not at all (`Upgrade`): the connection serves no other request.
    Unknown,
}

impl Head<'_> {
    /// Nothing follows the head: [`Head::framed`] without a body.
    pub fn bare(&self) -> bool {
        self.framed && self.content_length.unwrap_or(0) == 0
    }
}

/// A header value as text: visible ASCII and spaces only, as Pingora's
/// `to_str` (None otherwise).
pub fn text(value: &[u8]) -> Option<&str> {
    if value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// Whether a `Connection` header value lists `token`.
fn lists(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// The one parse of `Content-Length`, for every path (the HTTP/1 head, the
/// gateway's `max_body`, the relay's body). Returns the one length that
/// every field names (None without a field; a field may list the same value
/// several times, RFC 9110 §8.6), or why the fields are refused: a value
/// that is not a number, or values that disagree.
pub fn content_length<'a>(
    fields: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Option<u64>, &'static str> {
    let mut length = None;
    for value in fields.into_iter().flat_map(|f| f.split(|&b| b == b',')) {
        let n = length_value(value.trim_ascii()).ok_or("a Content-Length that is not a number")?;
        if length.is_some_and(|l| l != n) {
            return Err("Content-Length fields that disagree");
        }
        length = Some(n);
    }
    Ok(length)
}

/// The `Content-Length` of a Pingora request head ([`content_length`]);
/// None without one, or when it is refused.
pub fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    let fields = headers.get_all(http::header::CONTENT_LENGTH);
    content_length(fields.iter().map(|v| v.as_bytes()))
        .ok()
        .flatten()
}

/// Whether a `Host` value is an authority a backend can take: a host (a
/// name, an IPv4 address or a bracketed IPv6 one) and an optional port, of
/// the characters RFC 3986 allows there; no user information (`@`), no
/// space, nothing else. Checked by bytes: this runs for every request.
fn valid_host(value: &[u8]) -> bool {
    const ALLOWED: [bool; 256] = crate::ascii::alphanumeric_and(b"-._~%:[]!$&'()*+,;=");
    !value.is_empty() && crate::ascii::all_in(value, &ALLOWED)
}

/// A `Content-Length` value: 1 to 19 digits (no sign, no spaces).
fn length_value(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// The [`Head`] of the whole request head `buf` starts with (more may
/// follow it), by the same parser (httparse) Pingora uses. The error is
/// the refusal to answer with.
pub fn parse_head(buf: &[u8], require_host: bool) -> Result<Head<'_>, RequestError> {
    // Uninitialized: zeroing room for MAX_HEADERS headers would cost more
    // than parsing the few a long-poll has.
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Err(httparse::Error::TooManyHeaders) => {
            let detail = format!("more than {MAX_HEADERS} header lines");
            return Err(RequestError::HeaderTooLarge(detail));
        }
        Ok(httparse::Status::Partial) | Err(_) => {
            return Err(RequestError::BadRequest("malformed request head".into()))
        }
    };
    let target = req.path.unwrap_or_default();
    let http11 = req.version == Some(1);
    let mut parsed = Head {
        len,
        method: req.method.unwrap_or_default(),
        target,
        keepalive: http11,
        framed: true,
        content_length: None,
        ends: Ends::AtLength,
        last_event_id: None,
        if_none_match: None,
        accept: None,
        origin: None,
        content_type: None,
        authorization: None,
        forwarded_for: SmallVec::new(),
    };
    let bad = |detail: &str| Err(RequestError::BadRequest(detail.to_string()));
    let mut hosts = 0;
    let mut lengths: SmallVec<[&[u8]; 1]> = SmallVec::new();
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            if hosts > 1 {
                return bad("several Host headers");
            }
            if !valid_host(h.value) {
                return bad("the Host header is not a host and port");
            }
            if let Some(authority) = target::authority_of(parsed.target) {
                // An absolute-form target names the host itself: it must
                // agree with the Host header (as Pingora requires too).
                if !h.value.eq_ignore_ascii_case(authority.as_bytes()) {
                    let detail = "the Host header differs from the request target's authority";
                    return Err(RequestError::BadRequest(detail.into()));
                }
            }
        } else if name.eq_ignore_ascii_case("connection") {
            if lists(h.value, "close") {
                parsed.keepalive = false;
            } else if !http11 && lists(h.value, "keep-alive") {
                parsed.keepalive = true;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            lengths.push(h.value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Pingora takes chunked as the last coding only
            // (`pingora_refusal`).
            parsed.framed = false;
            if parsed.ends == Ends::AtLength {
                parsed.ends = Ends::Chunked;
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            parsed.framed = false;
            parsed.ends = Ends::Unknown;
        } else if name.eq_ignore_ascii_case("expect") {
            parsed.framed = false;
        } else if name.eq_ignore_ascii_case("last-event-id") {
            parsed.last_event_id = parsed.last_event_id.or(text(h.value));
        } else if name.eq_ignore_ascii_case("if-none-match") {
            parsed.if_none_match = parsed.if_none_match.or(text(h.value));
        } else if name.eq_ignore_ascii_case("accept") {
            parsed.accept = parsed.accept.or(text(h.value));
        } else if name.eq_ignore_ascii_case("origin") {
            parsed.origin = parsed.origin.or(text(h.value));
        } else if name.eq_ignore_ascii_case("content-type") {
            parsed.content_type = parsed.content_type.or(text(h.value));
        } else if name.eq_ignore_ascii_case("authorization") {
            parsed.authorization = parsed.authorization.or(Some(h.value));
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            parsed.forwarded_for.push(h.value);
        }
    }
    if hosts == 0 && http11 && require_host {
        return bad("an HTTP/1.1 request needs a Host header");
    }
    parsed.content_length = match content_length(lengths.iter().copied()) {
        Ok(length) => length,
        Err(detail) => return bad(detail),
    };
    // Several Content-Length fields of one value go through Pingora, and
    // reach a backend as one.
    parsed.framed &= lengths.len() <= 1;
    Ok(parsed)
}
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn heads_end_at_the_first_blank_line_found_incrementally() {
        let head = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nBODY";
        assert_eq!(head_end(head, 0), Some(head.len() - 4));
        // Found when the last read brought only the final "\n".
        assert_eq!(head_end(head, 27), Some(head.len() - 4));
        assert_eq!(head_end(b"GET /a HTTP/1.1\nHost: x\n\n", 0), Some(25));
        assert_eq!(head_end(b"GET /a HTTP/1.1\r\nHost: x\r\n", 0), None);
    }

    #[test]
    fn parses_method_and_target_or_refuses() {
        let head = parse_head(
            b"GET http://h/sub/a?cursor=1-0 HTTP/1.1\r\nHost: h\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(
            (head.method, head.target),
            ("GET", "http://h/sub/a?cursor=1-0")
        );
        assert!(head.keepalive && head.bare());
        let other_host = b"GET http://h/sub/a HTTP/1.1\r\nHost: elsewhere\r\n\r\n";
        assert_eq!(parse_head(other_host, false).unwrap_err().status(), 400);
        assert_eq!(
            parse_head(b"garbage\r\n\r\n", false).unwrap_err().status(),
            400
        );
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(300));
        assert_eq!(
            parse_head(many.as_bytes(), false).unwrap_err().status(),
            431
        );
    }

    #[test]
    fn reads_what_a_long_poll_needs_from_the_head() {
        let head = parse_head(
            b"GET /sub/a HTTP/1.1\r\nLast-Event-ID: 3-0\r\nlast-event-id: 4-0\r\n\
              Origin: https://x\r\nAccept: text/event-stream\r\nConnection: Close\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(head.last_event_id, Some("3-0"), "the first of two");
        assert_eq!(head.origin, Some("https://x"));
        assert_eq!(head.accept, Some("text/event-stream"));
        assert!(!head.keepalive);
        let old = parse_head(
            b"GET / HTTP/1.0\r\nConnection: keep-alive, x\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(old.keepalive);
        assert!(
            !parse_head(b"GET / HTTP/1.0\r\n\r\n", false)
                .unwrap()
                .keepalive
        );
        // Not visible ASCII: as if absent.
        let odd = parse_head(b"GET / HTTP/1.1\r\nIf-None-Match: \xff\r\n\r\n", false).unwrap();
        assert_eq!(odd.if_none_match, None);
    }

    #[test]
    fn a_body_is_framed_by_one_valid_content_length_only() {
        let head = parse_head(
            b"POST /v1/publish/a HTTP/1.1\r\nContent-Length: 12\r\n\
              Content-Type: application/json\r\nAuthorization: Bearer t\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(head.framed && !head.bare());
        assert_eq!(head.content_length, Some(12));
        assert_eq!(head.content_type, Some("application/json"));
        assert_eq!(head.authorization, Some(&b"Bearer t"[..]));
        assert!(
            parse_head(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", false)
                .unwrap()
                .bare()
        );
        // Anything else that makes more than a head is left to Pingora.
        for extra in [
            "Transfer-Encoding: chunked",
            "Upgrade: websocket",
            "Expect: 100-continue",
            "Content-Length: 5\r\nContent-Length: 5",
        ] {
            let text = format!("POST / HTTP/1.1\r\n{extra}\r\n\r\n");
            let head = parse_head(text.as_bytes(), false).unwrap();
            assert!(!head.framed && !head.bare(), "{extra}");
        }
        // One length, however many times it is said.
        let twice = parse_head(b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n", false);
        assert_eq!(twice.unwrap().content_length, Some(5));
    }

    #[test]
    fn heads_a_backend_would_choke_on_are_refused_with_a_reason() {
        for (extra, why) in [
            ("Host: a\r\nHost: b", "several Host"),
            ("Host: a@b", "not a host"),
            ("Host: a b", "not a host"),
            ("Host: ", "not a host"),
            (
                "Host: a\r\nContent-Length: 5\r\nContent-Length: 6",
                "disagree",
            ),
            ("Host: a\r\nContent-Length: 5, 6", "disagree"),
            ("Host: a\r\nContent-Length: +5", "not a number"),
            (
                "Host: a\r\nContent-Length: 99999999999999999999",
                "not a number",
            ),
            ("Host: a\r\nContent-Length:", "not a number"),
            ("X: y", "needs a Host"),
        ] {
            let text = format!("POST / HTTP/1.1\r\n{extra}\r\n\r\n");
            let e = parse_head(text.as_bytes(), true).unwrap_err();
            let (status, detail) = (e.status(), e.to_string());
            assert_eq!(status, 400, "{extra}");
            assert!(detail.contains(why), "{extra}: {detail}");
        }
        // HTTP/1.0 may leave Host out; the admin listener does not ask.
        assert!(parse_head(b"GET / HTTP/1.0\r\n\r\n", true).is_ok());
        assert!(parse_head(b"GET / HTTP/1.1\r\n\r\n", false).is_ok());
        assert!(parse_head(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", true).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        /// Any bytes: no panic, and the incremental search agrees with a
        /// whole scan however the bytes were split into reads.
        #[test]
        fn head_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), split in 0usize..300) {
            let _ = parse_head(&bytes, true);
            let split = split.min(bytes.len());
            let whole = head_end(&bytes, 0);
            let incremental = head_end(&bytes[..split], 0).or_else(|| head_end(&bytes, split));
            prop_assert_eq!(whole, incremental);
        }
    }
}
