//! The request target: the one parse of a client's request target that
//! routing, channel templates and authorization all read (docs/api.md,
//! "Request targets").
//!
//! Origin-form (`/a/b?q`) and absolute-form (`http://host/a/b?q`) are
//! accepted; anything else is refused. Path segments are percent-decoded
//! once, here: routes match the decoded segments, `{name}` captures are the
//! decoded segments, and the authorization request carries the same
//! segments re-encoded canonically ([`RequestTarget::path`]), so a target cannot be
//! authorized as one path and subscribed as another. Dot segments (`.`,
//! `..`, also percent-encoded) and malformed escapes are refused rather than
//! interpreted.

use crate::malformed::Malformed;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use smallvec::SmallVec;
use std::borrow::Cow;
use std::sync::OnceLock;

/// Bytes kept as they are when a decoded segment is encoded again: RFC 3986
/// unreserved characters, sub-delimiters, `:` and `@`.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'!')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b';')
    .remove(b'=')
    .remove(b':')
    .remove(b'@');

/// A parsed request target, in one allocation as a rule: its parts lie
/// back to back in one string.
#[derive(Debug, Clone)]
pub struct RequestTarget {
    /// The percent-decoded path segments, then the query, then the
    /// authority.
    text: String,
    /// Where each segment ends in `text` (each starts where the one before
    /// ends; `/a/b/` is `["a", "b", ""]`).
    ends: SmallVec<[u32; 6]>,
    /// The query exactly as sent, without `?`: its place in `text`.
    query: Option<(u32, u32)>,
    /// The authority of an absolute-form target (`host:port`): its place
    /// in `text`.
    authority: Option<(u32, u32)>,
    /// The segments encoded again canonically, with a leading `/`: made
    /// when first asked for (long-polls never need it).
    path: OnceLock<String>,
}

/// Targets are equal when they name the same segments, query and
/// authority (the canonical path follows from the segments).
impl PartialEq for RequestTarget {
    fn eq(&self, other: &RequestTarget) -> bool {
        // The parts are laid out the same way for the same parts.
        (&self.text, &self.ends, self.query, self.authority)
            == (&other.text, &other.ends, other.query, other.authority)
    }
}

/// The decoded segments of a [`RequestTarget`], in order.
#[derive(Clone)]
pub struct Segments<'a> {
    text: &'a str,
    ends: &'a [u32],
    start: usize,
}

impl<'a> Iterator for Segments<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let (&end, rest) = self.ends.split_first()?;
        let segment = &self.text[self.start..end as usize];
        (self.start, self.ends) = (end as usize, rest);
        Some(segment)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.ends.len(), Some(self.ends.len()))
    }
}

impl ExactSizeIterator for Segments<'_> {}

impl Eq for RequestTarget {}

impl RequestTarget {
    /// Parses a request target as it appears on the request line. The error
    /// says why it is refused .
    pub fn parse(raw: &str) -> Result<RequestTarget, Malformed> {
        let (authority, origin) = match raw.as_bytes().first() {
            Some(b'/') => (None, raw),
            _ => {
                let (authority, path) = absolute_form(raw)?;
                (Some(authority), path)
            }
        };
        let (path, query) = split_query(origin);
        let path = match path.bytes().position(|b| b == b'#') {
            Some(end) => &path[..end],
            None => path,
        };
        // Decoding never lengthens: every part fits in the raw length.
        let mut text = String::with_capacity(raw.len());
        let mut ends = SmallVec::new();
        let mut rest = &path[1..];
        loop {
            let end = rest.bytes().position(|b| b == b'/');
            decode_segment(&rest[..end.unwrap_or(rest.len())], &mut text)?;
            ends.push(text.len() as u32);
            match end {
                Some(end) => rest = &rest[end + 1..],
                None => break,
            }
        }
        let mut place = |part: &str| {
            let start = text.len() as u32;
            text.push_str(part);
            (start, text.len() as u32)
        };
        let query = query.map(&mut place);
        let authority = authority.map(&mut place);
        Ok(RequestTarget {
            text,
            ends,
            query,
            authority,
            path: OnceLock::new(),
        })
    }

    /// The decoded path segments that routes match.
    pub fn segments(&self) -> Segments<'_> {
        Segments {
            text: &self.text,
            ends: &self.ends,
            start: 0,
        }
    }

    /// The part of `text` at `place`.
    fn part(&self, place: Option<(u32, u32)>) -> Option<&str> {
        place.map(|(start, end)| &self.text[start as usize..end as usize])
    }

    /// The canonical path (decoded segments encoded again), starting with `/`.
    pub fn path(&self) -> &str {
        self.path.get_or_init(|| {
            let mut canonical = String::new();
            for s in self.segments() {
                canonical.push('/');
                canonical.extend(utf8_percent_encode(s, SEGMENT));
            }
            canonical
        })
    }

    /// The authority (`host:port`) of an absolute-form target; None for
    /// the usual origin-form.
    pub fn authority(&self) -> Option<&str> {
        self.part(self.authority)
    }

    /// The query as the client sent it, if any.
    pub fn query(&self) -> Option<&str> {
        self.part(self.query)
    }

    /// The canonical path followed by the query as sent.
    pub fn path_and_query(&self) -> String {
        match self.query() {
            Some(q) => format!("{}?{q}", self.path()),
            None => self.path().to_string(),
        }
    }

    /// The query's parameters in order, as sent: `(name, value)`, both
    /// still encoded (see [`form_decode`]); a parameter without `=` has an
    /// empty value. One pass over the query reads every parameter.
    pub fn query_pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        query_pairs(self.query().unwrap_or(""))
    }
}

/// The parameters of `query` (as sent, without `?`), as
/// [`RequestTarget::query_pairs`] reads them.
pub fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    let mut rest = query;
    std::iter::from_fn(move || {
        while !rest.is_empty() {
            let end = memchr::memchr(b'&', rest.as_bytes()).unwrap_or(rest.len());
            let pair = &rest[..end];
            rest = rest.get(end + 1..).unwrap_or("");
            if !pair.is_empty() {
                return Some(match memchr::memchr(b'=', pair.as_bytes()) {
                    Some(eq) => (&pair[..eq], &pair[eq + 1..]),
                    None => (pair, ""),
                });
            }
        }
        None
    })
}

/// The path and the query (without `?`, None when there is no `?`) of an
/// origin-form target, both as sent.
pub fn split_query(origin: &str) -> (&str, Option<&str>) {
    match memchr::memchr(b'?', origin.as_bytes()) {
        Some(q) => (&origin[..q], Some(&origin[q + 1..])),
        None => (origin, None),
    }
}

/// The authority (`host:port`) a raw request target names: Some for an
/// absolute-form target that parses as one, None for any other.
pub fn authority_of(raw: &str) -> Option<&str> {
    if raw.starts_with('/') {
        return None;
    }
    absolute_form(raw).ok().map(|(authority, _)| authority)
}

/// A query value form-decoded: `+` is a space, escapes are decoded, invalid
/// UTF-8 is replaced. Borrowed when there is nothing to decode (cursors and
/// timeouts, as a rule).
pub fn form_decode(value: &str) -> Cow<'_, str> {
    if memchr::memchr2(b'+', b'%', value.as_bytes()).is_none() {
        return Cow::Borrowed(value);
    }
    let spaced = value.replace('+', " ");
    Cow::Owned(percent_decode_str(&spaced).decode_utf8_lossy().into_owned())
}

/// The authority and the path with query of an absolute-form target
/// (`http://host/p?q`). User-info (`http://user@host/`) is refused.
fn absolute_form(raw: &str) -> Result<(&str, &str), Malformed> {
    let refuse = || {
        Malformed(format!(
            "request target '{}' is neither a path nor an http(s) URL",
            shorten(raw)
        ))
    };
    let (scheme, rest) = raw.split_once("://").ok_or_else(refuse)?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(refuse());
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.is_empty() || authority.contains('@') {
        return Err(refuse());
    }
    match &rest[end..] {
        "" => Ok((authority, "/")),
        p if p.starts_with('/') => Ok((authority, p)),
        _ => Err(Malformed(format!(
            "request target '{}' has a query but no path",
            shorten(raw)
        ))),
    }
}

/// Decodes one path segment onto `out`, refusing dot segments and bad
/// escapes.
fn decode_segment(raw: &str, out: &mut String) -> Result<(), Malformed> {
    let bytes = raw.as_bytes();
    if !bytes.contains(&b'%') {
        // Nothing to decode (the usual case).
        if raw == "." || raw == ".." {
            return Err(dot_segments());
        }
        out.push_str(raw);
        return Ok(());
    }
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%' {
            let hex = bytes.get(i + 1..i + 3).unwrap_or(&[]);
            if hex.len() != 2 || !hex.iter().all(u8::is_ascii_hexdigit) {
                return Err(Malformed(format!(
                    "path segment '{}' has a malformed percent escape",
                    shorten(raw)
                )));
            }
        }
    }
    let decoded = percent_decode_str(raw).decode_utf8().map_err(|_| {
        Malformed(format!(
            "path segment '{}' is not UTF-8 once decoded",
            shorten(raw)
        ))
    })?;
    if decoded == "." || decoded == ".." {
        return Err(dot_segments());
    }
    out.push_str(&decoded);
    Ok(())
}

fn dot_segments() -> Malformed {
    Malformed("dot segments ('.', '..') are not allowed in a request path".into())
}

fn shorten(s: &str) -> String {
    s.chars()
        .take(80)
        .collect::<String>()
        .escape_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(raw: &str) -> RequestTarget {
        RequestTarget::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"))
    }

    fn segments(raw: &str) -> Vec<String> {
        ok(raw).segments().map(str::to_owned).collect()
    }

    #[test]
    fn origin_and_absolute_forms_parse_alike() {
        let t = ok("/rooms/1/events?cursor=1-0&x=a+b%21");
        assert_eq!(t.segments().collect::<Vec<_>>(), ["rooms", "1", "events"]);
        assert_eq!(t.segments().len(), 3);
        assert_eq!(t.path(), "/rooms/1/events");
        assert_eq!(t.query(), Some("cursor=1-0&x=a+b%21"));
        let param = |name| {
            t.query_pairs()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| form_decode(v))
        };
        assert_eq!(param("x").as_deref(), Some("a b!"));
        assert_eq!(param("cursor").as_deref(), Some("1-0"));
        assert_eq!(param("nope"), None);
        let q = ok("/a?&b&c=&d=1=2&&");
        let pairs: Vec<_> = q.query_pairs().collect();
        assert_eq!(pairs, [("b", ""), ("c", ""), ("d", "1=2")]);
        let a = ok("HTTP://gw.example:8080/rooms/1/events?cursor=1-0&x=a+b%21");
        assert_eq!(a.authority(), Some("gw.example:8080"));
        assert!(a.segments().eq(t.segments()) && a.query() == t.query());
        assert_ne!(a, t, "the authority differs");
        assert_eq!(ok("http://gw.example").path(), "/");
        assert_eq!(segments("/"), [""]);
        assert_eq!(segments("/a/"), ["a", ""]);
        assert_eq!(segments("/a//b"), ["a", "", "b"]);
        assert_eq!(ok("/a/b?q"), ok("/a/b?q"));
        assert_ne!(ok("/a/b"), ok("/ab"));
        assert_ne!(ok("/a?b"), ok("/a/b"));
    }

    #[test]
    fn segments_are_decoded_once_and_encoded_canonically() {
        let t = ok("/s%75b/a%2Fb/%E2%9C%93/x%20y");
        assert_eq!(t.segments().collect::<Vec<_>>(), ["sub", "a/b", "✓", "x y"]);
        assert_eq!(t.path(), "/sub/a%2Fb/%E2%9C%93/x%20y");
        assert!(
            ok(t.path()).segments().eq(t.segments()),
            "canonical is stable"
        );
        assert_eq!(ok("/a?b=/../c").path_and_query(), "/a?b=/../c");
    }

    #[test]
    fn refuses_dot_segments_bad_escapes_and_other_forms() {
        for bad in [
            "/a/../b",
            "/a/./b",
            "/..",
            "/a/%2e%2E/b",
            "/a/%2e",
            "/a%zz",
            "/a%4",
            "/%",
            "/%ff%fe",
            "*",
            "example.com:443",
            "ftp://h/a",
            "http:///a",
            "http://h?x",
            "http://user@h/a",
            "",
        ] {
            assert!(
                RequestTarget::parse(bad).is_err(),
                "{bad:?} must be refused"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Any input: no panic; what parses has a canonical form that parses
        /// to the same segments.
        #[test]
        fn never_panics_and_canonical_form_round_trips(raw in "\\PC{0,64}|(/[a-zA-Z0-9%._~:@+-]{0,12}){0,5}(\\?[a-z=&%+]{0,12})?") {
            if let Ok(t) = RequestTarget::parse(&raw) {
                let again = RequestTarget::parse(&t.path_and_query()).unwrap();
                prop_assert!(again.segments().eq(t.segments()));
                prop_assert!(t.segments().all(|s| s != "." && s != ".."));
            }
        }
    }
}
