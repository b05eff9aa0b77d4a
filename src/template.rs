//! Templates: path templates with `{name}` segments, prefix routes, channel
//! templates and channel-name rules (docs/configuration.md, "Routes").
//!
//! A [`PathTemplate`] matches whole segments of a request path and captures
//! `{name}` segments; a template ending in `/` (or the single `/`) matches any
//! path under it. A [`ChannelTemplate`] renders a channel name from captures.
//!
//! Their errors: [`TemplateError`], why a route's template is refused (a
//! config problem); [`RenderError`], why a request's captures make no
//! channel name (a 400 detail); [`ChannelNameError`], the rules of names.

use compact_str::CompactString;
use smallvec::SmallVec;
use std::fmt;

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 256;

/// Why a channel name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelNameError {
    /// Empty, or longer than [`MAX_CHANNEL_LEN`]: its length.
    #[error("channel names are 1 to {max} bytes, got {0}", max = MAX_CHANNEL_LEN)]
    Length(usize),
    /// Its first character that a name may not hold.
    #[error("'{0}' is not allowed in a channel name (allowed: A-Z a-z 0-9 _ . : @ / -)")]
    Disallowed(char),
}

/// Whether `name` may be a channel name.
pub fn check_channel(name: &str) -> Result<(), ChannelNameError> {
    if name.is_empty() || name.len() > MAX_CHANNEL_LEN {
        return Err(ChannelNameError::Length(name.len()));
    }
    disallowed(name).map_or(Ok(()), |c| Err(ChannelNameError::Disallowed(c)))
}

/// Why a channel name is refused, as text; `None` when it is valid.
pub fn channel_problem(name: &str) -> Option<String> {
    check_channel(name).err().map(|e| e.to_string())
}

/// Why a path or channel template is refused (after its key path).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("'{0}' must start with '/'")]
    NotAbsolute(String),
    #[error("'{0}' has an empty segment")]
    EmptySegment(String),
    #[error("'{path}' names {{{name}}} twice")]
    CapturedTwice { path: String, name: String },
    /// A `{...}` segment whose name is not letters, digits and `_`.
    #[error("'{0}' is not a valid {{name}} (letters, digits, _)")]
    BadName(String),
    /// A segment with `{` or `}` that is not a whole `{name}`.
    #[error("'{0}': a {{name}} must be a whole segment")]
    PartSegment(String),
    #[error("'{0}' has an unclosed '{{'")]
    Unclosed(String),
    /// A channel template's placeholder that the path does not capture.
    #[error("'{text}' uses {{{name}}}, which the route's path does not capture")]
    NotCaptured { text: String, name: String },
    #[error("'{0}' has a '}}' without '{{'")]
    StrayClose(String),
    #[error("a channel template cannot be empty")]
    EmptyChannel,
    /// A character of a channel template's literal text that no channel
    /// name may hold.
    #[error("'{text}': '{c}' is not allowed in a channel name")]
    Disallowed { text: String, c: char },
}

/// Why a channel template made no channel name of a request's captures:
/// the detail of its 400 answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("channel '{}': {}", .channel.escape_default(), .why)]
pub struct RenderError {
    /// What was rendered.
    pub channel: CompactString,
    pub why: ChannelNameError,
}

/// The first character of `name` a channel name may not hold. Every
/// allowed character is ASCII, so a byte test finds it.
fn disallowed(name: &str) -> Option<char> {
    const ALLOWED: [bool; 256] = crate::ascii::alphanumeric_and(b"_.:@/-");
    let at = crate::ascii::first_outside(name.as_bytes(), &ALLOWED)?;
    name[at..].chars().next()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// Borrowed by every match's [`Params`].
    Param(String),
}

/// A compiled route path.
#[derive(Debug, Clone)]
pub struct PathTemplate {
    segments: Vec<Segment>,
    prefix: bool,
}

/// Path parameters captured by a match, in path order, named by the
/// route's own strings (a route has a few: a list is cheaper than a map,
/// and two values of up to 24 bytes each are held without an allocation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params<'r>(SmallVec<[(&'r str, CompactString); 2]>);

impl<'r> Params<'r> {
    /// No parameters.
    pub fn new() -> Params<'r> {
        Params::default()
    }

    /// Sets parameter `name` (replacing an earlier value).
    pub fn insert(&mut self, name: &'r str, value: &str) {
        let value = CompactString::from(value);
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => *v = value,
            None => self.0.push((name, value)),
        }
    }

    /// The value of parameter `name`, if captured.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.value(name).map(CompactString::as_str)
    }

    fn value(&self, name: &str) -> Option<&CompactString> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

impl PathTemplate {
    /// Compiles `path`; the error says what is wrong with it.
    pub fn parse(path: &str) -> Result<PathTemplate, TemplateError> {
        let rest = path
            .strip_prefix('/')
            .ok_or_else(|| TemplateError::NotAbsolute(path.into()))?;
        let prefix = path.ends_with('/');
        let body = rest.strip_suffix('/').unwrap_or(rest);
        let mut segments = Vec::new();
        if !body.is_empty() {
            for seg in body.split('/') {
                if seg.is_empty() {
                    return Err(TemplateError::EmptySegment(path.into()));
                }
                segments.push(match param_name(seg)? {
                    Some(name) => {
                        let name = name.to_string();
                        if segments.contains(&Segment::Param(name.clone())) {
                            let path = path.into();
                            return Err(TemplateError::CapturedTwice { path, name });
                        }
                        Segment::Param(name)
                    }
                    None => Segment::Literal(seg.to_string()),
                });
            }
        }
        Ok(PathTemplate { segments, prefix })
    }

    /// Names of the `{name}` segments.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Param(n) => Some(n.as_str()),
            Segment::Literal(_) => None,
        })
    }

    /// Matches the decoded segments of a request path (see
    /// [`RequestTarget`](crate::target::RequestTarget)). Returns the captures or None.
    pub fn matches<'s>(&self, path: impl Iterator<Item = &'s str>) -> Option<Params<'_>> {
        let mut parts = path;
        let mut params = Params::new();
        for seg in &self.segments {
            let part = parts.next()?;
            match seg {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return None,
                Segment::Param(name) => {
                    if part.is_empty() {
                        return None;
                    }
                    params.insert(name, part);
                }
            }
        }
        // Nothing left, or only the empty segment of a trailing slash.
        let exact = match parts.next() {
            None => true,
            Some(last) => last.is_empty() && parts.next().is_none(),
        };
        (exact || self.prefix).then_some(params)
    }
}

/// `{name}` → Some(name); a plain segment → None; a malformed one → Err.
fn param_name(seg: &str) -> Result<Option<String>, TemplateError> {
    match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
        Some(name)
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
        {
            Ok(Some(name.to_string()))
        }
        Some(_) => Err(TemplateError::BadName(seg.into())),
        None if seg.contains(['{', '}']) => Err(TemplateError::PartSegment(seg.into())),
        None => Ok(None),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Param(String),
}

/// A channel name with `{name}` placeholders, e.g. `room:{room}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelTemplate {
    pieces: Vec<Piece>,
}

impl ChannelTemplate {
    /// Compiles `text`, checking its literal parts and that every
    /// placeholder is one of `params`.
    pub fn parse<'a>(
        text: &str,
        params: impl IntoIterator<Item = &'a str> + Clone,
    ) -> Result<ChannelTemplate, TemplateError> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            let (lit, after) = rest.split_at(open);
            let close = after
                .find('}')
                .ok_or_else(|| TemplateError::Unclosed(text.into()))?;
            let name = &after[1..close];
            if !params.clone().into_iter().any(|p| p == name) {
                return Err(TemplateError::NotCaptured {
                    text: text.into(),
                    name: name.into(),
                });
            }
            if !lit.is_empty() {
                pieces.push(Piece::Text(lit.to_string()));
            }
            pieces.push(Piece::Param(name.to_string()));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(TemplateError::StrayClose(text.into()));
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        if pieces.is_empty() {
            return Err(TemplateError::EmptyChannel);
        }
        for p in &pieces {
            if let Piece::Text(t) = p {
                if let Some(c) = disallowed(t) {
                    let text = text.into();
                    return Err(TemplateError::Disallowed { text, c });
                }
            }
        }
        Ok(ChannelTemplate { pieces })
    }

    /// Renders the channel name for `params` (inline up to 24 bytes: a
    /// poll allocates nothing for it, as a rule); the error is a 400 detail.
    pub fn render(&self, params: &Params) -> Result<CompactString, RenderError> {
        let out = match self.pieces.as_slice() {
            // The usual `{channel}`: the capture is the name.
            [Piece::Param(n)] => params.value(n).cloned().unwrap_or_default(),
            _ => self.concat(params),
        };
        match check_channel(&out) {
            Ok(()) => Ok(out),
            Err(why) => Err(RenderError { channel: out, why }),
        }
    }

    /// The pieces written out one after the other.
    fn concat(&self, params: &Params) -> CompactString {
        let piece = |p: &'_ Piece| match p {
            Piece::Text(t) => t.len(),
            Piece::Param(n) => params.get(n).map_or(0, str::len),
        };
        let mut out = CompactString::with_capacity(self.pieces.iter().map(piece).sum());
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Param(n) => out.push_str(params.get(n).unwrap_or("")),
            }
        }
        out
    }
}

impl fmt::Display for ChannelTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.pieces {
            match p {
                Piece::Text(t) => f.write_str(t)?,
                Piece::Param(n) => write!(f, "{{{n}}}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::RequestTarget;

    #[test]
    fn paths_match_whole_segments_and_prefixes() {
        fn m<'t>(t: &'t PathTemplate, path: &str) -> Option<Params<'t>> {
            t.matches(RequestTarget::parse(path).unwrap().segments())
        }
        let t = PathTemplate::parse("/rooms/{room}/events").unwrap();
        assert_eq!(m(&t, "/rooms/1/events").unwrap().get("room").unwrap(), "1");
        assert_eq!(
            m(&t, "/rooms/a%3Ab/events").unwrap().get("room").unwrap(),
            "a:b"
        );
        assert_eq!(
            m(&t, "/r%6Foms/1/events/").unwrap().get("room").unwrap(),
            "1"
        );
        assert_eq!(
            m(&t, "/rooms/a%2Fb/events").unwrap().get("room").unwrap(),
            "a/b"
        );
        assert!(m(&t, "/rooms/1/events/x").is_none());
        assert!(m(&t, "/rooms//events").is_none());
        assert!(m(&t, "/rooms/1").is_none());
        let p = PathTemplate::parse("/api/").unwrap();
        assert!(m(&p, "/api/x/y").is_some());
        assert!(m(&p, "/apix").is_none());
        assert!(m(&PathTemplate::parse("/").unwrap(), "/anything").is_some());
        assert!(PathTemplate::parse("rooms").is_err());
        assert!(PathTemplate::parse("/a/x{b}").is_err());
        assert!(PathTemplate::parse("/a/{b}/{b}").is_err());
    }

    #[test]
    fn channel_templates_render_and_validate() {
        let t = ChannelTemplate::parse("room:{room}", ["room"]).unwrap();
        let mut p = Params::new();
        p.insert("room", "42");
        assert_eq!(t.render(&p).unwrap(), "room:42");
        p.insert("room", "a b");
        assert!(t.render(&p).is_err());
        let whole = ChannelTemplate::parse("{room}", ["room"]).unwrap();
        assert!(whole.render(&p).is_err(), "a capture is checked as a name");
        p.insert("room", "r:1");
        assert_eq!(whole.render(&p).unwrap(), "r:1");
        assert!(whole.render(&Params::new()).is_err(), "no capture, no name");
        // The 400 details, as they were when these were strings.
        p.insert("room", "a\tb");
        assert_eq!(
            t.render(&p).unwrap_err().to_string(),
            "channel 'room:a\\tb': '\t' is not allowed in a channel name \
             (allowed: A-Z a-z 0-9 _ . : @ / -)"
        );
        assert_eq!(
            whole.render(&Params::new()).unwrap_err().to_string(),
            "channel '': channel names are 1 to 256 bytes, got 0"
        );
        assert!(ChannelTemplate::parse("room:{nope}", ["room"]).is_err());
        assert!(ChannelTemplate::parse("bad channel", ["room"]).is_err());
        assert!(ChannelTemplate::parse("room:{room", ["room"]).is_err());
        assert!(channel_problem(&"x".repeat(257)).is_some());
        let why = channel_problem("caf\u{e9}").unwrap();
        assert!(why.starts_with("'\u{e9}' is not allowed"), "{why}");
        assert_eq!(channel_problem("a-Z_0.9:@/b"), None);
    }
}
